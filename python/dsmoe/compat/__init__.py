"""Drop-in modules with the Python APIs of the libraries frameworks already call (``import
dsmoe.compat.deep_ep as deep_ep``), backed by dsmoe. Each submodule is imported on its own: nothing is
imported eagerly here, so one module's dependencies never load with another's. See docs/compat.md."""
