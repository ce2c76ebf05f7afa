from .defaults import add_d2_refine_config, add_shapes_config, node_class  # noqa: F401
