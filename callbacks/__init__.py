"""Lightning callbacks of cl-plugin (installed as ``cl_plugin.callbacks``)."""

__all__: list[str] = []
