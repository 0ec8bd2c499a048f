"""Training: one loop for every model the factory trains, the batch sources (teacher, self,
labels), the distillation objectives and the feature (FitNets) term."""
