"""The generation core: one generation per answer, its event log and subscribers, the registry."""
