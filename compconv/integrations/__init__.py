"""Optional integrations with other frameworks. Nothing here is imported by the rest of the package:
import a submodule explicitly (``custom_imports=dict(imports=['compconv.integrations.mmdet'])``)."""
