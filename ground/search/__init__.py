"""Architecture search on the target's own clock: the student family (space), what a candidate is
worth as deployed (objectives), the Optuna study and its workers (study), the Pareto front (front)."""
