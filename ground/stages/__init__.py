"""The factory's stages: each a function from a run (ground.stages.run.Run) and an input artifact
of its folder to an output artifact and a lineage StageRecord. distill -> prune / sweep ->
fp16_finetune -> export -> bundle."""
