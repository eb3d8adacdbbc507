"""Names from other tools over Scrutiny's own, so their users can switch by changing imports."""
