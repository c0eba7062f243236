"""Stand-ins for cloud APIs, and the VM booter they all use to run user-data here."""
