"""User-facing errors: one clear line that names the problem and, where possible, the fix."""


class RayembedError(Exception):
    """An error the user can act on. The CLI prints its message alone, without a traceback."""


class ModelLoadError(RayembedError):
    pass


class InvalidInputError(RayembedError):
    pass


class ConfigError(RayembedError):
    pass
