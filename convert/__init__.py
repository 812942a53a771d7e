"""Checkpoint I/O: HF LLaVA safetensors <-> our params (one key table), Orbax save/restore, config.json <-> configs.

    convert_checkpoint(hf_dir, out_dir, dtype=None, progress=True)   HF directory -> ours (Orbax)
    export_checkpoint(our_dir, hf_dir, max_shard_bytes=None)          ours -> transformers-loadable directory
    load_model(path, dtype=None, mesh=None) -> models.llava.Llava     from either kind of directory (sharded on a mesh)
    save_model(model, out_dir, assets_from=None)                      a (trained) model -> ours
    tokenizer_path(path), processor_path(path)                        where AutoTokenizer / the processor load from
"""
from svdprune_jax.convert.checkpoint import (abstract_model, abstract_params, atomic_dir, convert_checkpoint, dtype_name,
                                export_checkpoint, is_ours, load_model, save_model)
from svdprune_jax.convert.hf_config import config_to_hf, processor_path, read_config, tokenizer_path
from svdprune_jax.convert.orbax_io import restore_params, save_params
