"""``python -m dask_secure_cloud.options``: rewrite the config files from the classes."""

from .files import write_config_files

for written in write_config_files():
    print(f"wrote {written}")
