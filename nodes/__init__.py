"""ComfyUI nodes of the pack: thin V3 node classes over mixture_core and the host adapters."""
