"""Teachers: the big models whose outputs the students learn from, by name (ground.teachers.registry),
and their outputs cached on disk (ground.teachers.cache)."""
