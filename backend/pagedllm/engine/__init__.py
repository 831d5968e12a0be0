"""The paged-KV engine, one file per job: sequence, block_manager, scheduler, model_runner, sampler, engine."""
