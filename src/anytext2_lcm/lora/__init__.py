"""LoRA students of AnyText2 through PEFT: target inspection, injection, scale / merge, save / load and export.

Four concerns, one section each:

1. **Inventory** (``module_table``): every ``nn.Linear`` / ``nn.Conv2d`` of an ``AnyText2`` with its network, part
   and role, using the same role vocabulary as ``reference/anytext2_sd15_linear_conv_modules.json`` (731 modules on
   ``sd15``). Works on a model built on the ``meta`` device, so the real architecture costs nothing to inspect.
2. **Target presets** (``TARGET_PRESETS``): named module selections, combinable with ``+`` (``"lcm+zero-convs"``),
   resolved to full module names relative to the ``AnyText2`` root. Those names are exactly what PEFT's
   ``LoraConfig(target_modules=[...])`` matches, so a targets file written by ``anytext2-lcm inspect`` is a PEFT
   config.
3. **Adapters** (``LoraSpec``, ``apply_lora``, ``disable_adapters``, ``set_lora_scale``, ``merge_lora``,
   ``unmerge_lora``, ``unload_lora``): PEFT's ``inject_adapter_in_model`` on the whole ``AnyText2`` — no
   ``PeftModel`` wrapper, so the model keeps its own methods (``denoise``, ``control``, ...) and there is one network
   in memory: the teacher is the same model inside ``with disable_adapters(model):``. No LoRA layer is written here;
   PEFT's ``lora.Linear`` / ``lora.Conv2d`` do the work.
4. **Files** (``save_lora``, ``load_lora``, ``export_merged``, ``export_kohya``, ``export``):

   * a PEFT adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``; keys as
     ``PeftModel.save_pretrained`` writes them, so ``PeftModel.from_pretrained(AnyText2(cfg), folder)`` also reads
     it). The weights are PEFT's own ``get_peft_model_state_dict`` — never diffusers'
     ``convert_state_dict_to_diffusers``, which silently loses attention LoRAs on reload (ecosystem.md §3.1);
   * one ``.safetensors`` file (root-relative PEFT keys, the ``LoraConfig`` in the metadata);
   * a full merged checkpoint in the ORIGINAL key layout (``model.diffusion_model.*``, ``control_model.*``,
     ``first_stage_model.*`` in ldm names, ...) as ``.safetensors`` or a ``{"state_dict": ...}`` ``.ckpt``, which
     the teacher loader and AnyText2's own code read;
   * a kohya-style ``.safetensors`` (``lora_unet_<diffusers path>.lora_down/lora_up/alpha``), the format
     AnyText2's ``ms_wrapper.merge_loras`` merges. That code maps names through a plain diffusers SD-1.5 UNet, so it
     merges the SD-1.5 part of the UNet LoRA but skips AttnX and WriteNet modules (``export_kohya`` reports them);
     prefer the merged checkpoint for AnyText2's tools.

   Loading accepts all four forms; pickled files (``.bin``/``.pt``) go through ``safe_torch_load``
   (``weights_only=True``) and anything needing arbitrary unpickling is refused without being executed.

Trap 10 of DESIGN.md: the original ``ControlledUnetModel`` ran its input blocks under ``no_grad`` (input_attnx
False), so a LoRA placed there silently got no gradient. Our UNet has no such switch: LoRA in the input blocks
trains (``tests/test_lora.py`` checks it), and what is frozen is decided here, by ``apply_lora``.
"""

# The public API lives in these modules, each building only on the ones before it: inventory, targets, adapters,
# kohya (kohya-style names, reading and writing), files (save / load / merged export and the one ``export`` entry
# point) and style (community kohya LoRAs merged at a ratio, ``anytext2_lcm.lora.style``).

from .inventory import (  # noqa: F401
    NETWORKS, ROLES,
    ModuleInfo, classify, module_table, seed_categories,
)
from .targets import (  # noqa: F401
    TARGET_PRESETS,
    TARGETS_FORMAT, TargetPreset, format_inventory, parse_preset_expression, resolve_targets, targets_document,
    write_targets,
    read_targets,
)
from .adapters import (  # noqa: F401
    LoraSpec, lora_layers, adapter_names, trainable_parameters, apply_lora, disable_adapters, use_adapter,
    set_lora_scale, merge_lora, unmerge_lora, unload_lora,
)
from .kohya import (  # noqa: F401
    kohya_names, export_kohya,
)
from .files import (  # noqa: F401
    ADAPTER_FORMAT, PEFT_PREFIX, ADAPTER_WEIGHTS, ADAPTER_CONFIG, STUDENT_INFO, adapter_info, lora_state_dict,
    save_lora, load_lora, merged_state_dict, export_merged, EXPORT_FORMATS, export,
)

__all__ = [
    "NETWORKS", "ROLES", "TARGET_PRESETS",
    "ADAPTER_CONFIG", "ADAPTER_FORMAT", "ADAPTER_WEIGHTS", "EXPORT_FORMATS", "LoraSpec", "ModuleInfo",
    "PEFT_PREFIX", "STUDENT_INFO", "TARGETS_FORMAT", "TargetPreset", "adapter_info", "adapter_names", "apply_lora", "classify", "disable_adapters",
    "export", "export_kohya", "export_merged", "format_inventory", "kohya_names", "load_lora", "lora_layers",
    "lora_state_dict", "merge_lora", "merged_state_dict", "module_table", "parse_preset_expression", "read_targets",
    "resolve_targets", "save_lora", "seed_categories", "set_lora_scale", "targets_document", "trainable_parameters",
    "unload_lora", "unmerge_lora", "use_adapter", "write_targets",
]
