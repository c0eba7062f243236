"""Everything that runs on a VM, kept apart from the client's code.

The VM's image needs Dask, not this package: what is here is shipped as files (the boot
script's parts in ``boot/``), so it may use only the standard library and Dask's own
packages, and nothing of the client (``tests/test_vm_side.py`` holds it to that).
"""
