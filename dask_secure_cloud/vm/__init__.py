"""Everything that runs on a VM, kept apart from the client's code.

The VM's image needs Dask, not this package: what is here is shipped as files (the boot
script's parts in ``boot/``; each Python file a VM gets, and the modules it is made of,
in ``preloads.SHIPPED``), so it may use only the standard library and Dask's own
packages, and of this package only the modules shipped in the same file, imported
relatively (``tests/test_vm_side.py`` holds it to that).
"""
