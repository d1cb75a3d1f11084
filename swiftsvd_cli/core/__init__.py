"""Pure math: tensors in, tensors out. Imports only torch and the standard library: no files, hub, logging, devices."""
