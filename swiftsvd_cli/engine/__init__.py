"""Machinery several stages share over a WORK directory: the eigenbasis cache, spectra and factor sources."""
