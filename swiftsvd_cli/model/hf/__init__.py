"""Modeling code shipped inside every factored checkpoint, so that plain transformers loads it.

The modules in `SHIPPED` are written next to the weights of a compressed directory, whose `config.json` names
them in `auto_map`: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` then builds the factored
model. They import only torch, transformers, the standard library and each other, by relative imports
(transformers' dynamic-module loader copies relatively imported siblings), and swiftsvd imports the very same
modules: the code beside the weights and the code `load_compressed` runs are one source.

To ship a new module: add the file here, import it relatively
from `modeling_swiftsvd.py` (or from a module it imports), append its name to `SHIPPED`, and switch it on from a
field of the config's `swiftsvd` section. tests/test_hf_checkpoint.py checks that the list is closed under
relative imports and that the modules stay self-contained.
"""

from pathlib import Path

SOURCE = Path(__file__).parent
SHIPPED = ("configuration_swiftsvd.py", "modeling_swiftsvd.py", "lowrank.py", "qlinear.py", "latent_kv.py")
