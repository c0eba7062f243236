"""The lease's end on a cloud that keeps (and bills) a VM that powered off.

There, a scheduler whose lease expired deletes the cluster's VMs before it closes: the
cloud's own code (``Driver.lease_end``, such as ``azure_reaper.py``) defines
``on_expiry(resources)``, and comes first in the scheduler's lease file, then
``lease.py``, then this module, which hands ``on_expiry`` to the lease. Each renewal
then names the cluster's VMs, and ``on_expiry`` is given those the last one named.

A lease without it ships neither this module nor any code that could delete a VM.
"""

from .lease import BEFORE_CLOSE

# Defined by the cloud's code before this module in the same file (absent in the
# client's process, which only imports this module).
_on_expiry = globals().get("on_expiry")
if _on_expiry is not None:
    BEFORE_CLOSE.append(_on_expiry)
