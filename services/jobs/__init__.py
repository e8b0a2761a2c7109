"""Fine-tuning as a service: the jobs API, its Redis store, dataset validation and training workers."""
