"""EC2's instance states in the words of ``Driver.state``."""

from __future__ import annotations

_LIVE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]
#: An instance in these states has ended, or is ending: its OS powered off and EC2
#: terminated it (``InstanceInitiatedShutdownBehavior=terminate``): nothing bills.
_ENDED_STATES = frozenset({"shutting-down", "terminated"})
#: An instance in these states still exists, and its EBS volumes bill: someone stopped
#: it through the API or the console (a shutdown from its OS terminates it).
_STOPPED_STATES = frozenset({"stopping", "stopped"})


def _word(state: str) -> str:
    """An instance state as ``Driver.state`` words it: ``"stopped"`` where it still
    exists and bills (its volumes), ``"terminated"`` where it ended and nothing bills."""
    if state in _ENDED_STATES:
        return "terminated"
    if state in _STOPPED_STATES:
        return "stopped"
    return "running"


def _listed_state(name: str | None) -> str:
    """An instance's state in :meth:`Driver.state`'s words, for ``list``. Shutting down
    ends in terminated (the cluster's instances terminate on shutdown) and bills no
    more; a stopped instance is one a person stopped, and its volume still bills."""
    if name in ("pending", "running"):
        return "running"
    if name in ("stopping", "stopped"):
        return "stopped"
    if name in ("shutting-down", "terminated"):
        return "terminated"
    return "unknown"
