"""Every option of every cluster class, once: name, type, default, meaning and check.

One frozen dataclass per provider. :class:`ClusterOptions` holds the options every
cluster shares; :class:`CloudOptions` adds who may reach the scheduler; each provider's
class adds its own options and may change a shared default (``LocalOptions`` runs
``runtime="native"``). Everything else is derived from these classes, so adding an
option is one field here (plus, where the driver needs it, the line that uses it):

- the dask config defaults (``secure-cloud.yaml``) and their JSON schema
  (``secure-cloud-schema.yaml``), written by ``python -m dask_secure_cloud.options`` and
  proven equal to these classes by a test;
- the keyword signature and the "Parameters" section of each cluster class's docstring;
- the keys a misspelled dask config key is checked against.

:func:`resolve` is the one rule for reading options, for keywords and config alike: a
keyword beats ``secure-cloud.<provider>.<key>``, which beats ``secure-cloud.<key>``,
whose default ships from here; then the option's own check runs on the value, wherever
it came from, and turns it into the type the field declares (``"12h"`` into a
``timedelta``, a list into a tuple). Checks here need no cloud SDK: those that do (is
this an EC2 region?) run in the provider's module, still before anything is made.
"""

from __future__ import annotations

from .aws import EC2Options
from .azure import AzureOptions
from .base import default, option, specs
from .digitalocean import DropletOptions
from .files import (
    OPTION_CLASSES,
    config_defaults,
    config_schema,
    defaults_yaml,
    docstring_parameters,
    keyword_signature,
    schema_yaml,
    write_config_files,
)
from .gcp import GCPOptions
from .local import LocalOptions
from .resolving import resolve
from .shared import CloudOptions, ClusterOptions

__all__ = [
    "OPTION_CLASSES",
    "AzureOptions",
    "CloudOptions",
    "ClusterOptions",
    "DropletOptions",
    "EC2Options",
    "GCPOptions",
    "LocalOptions",
    "config_defaults",
    "config_schema",
    "default",
    "defaults_yaml",
    "docstring_parameters",
    "keyword_signature",
    "option",
    "resolve",
    "schema_yaml",
    "specs",
    "write_config_files",
]
