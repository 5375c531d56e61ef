"""Everything that knows about ranks: topology, dispatch, pipeline schedules, ZeRO."""
