"""The worker of tests/engine/test_distributed.py, in a module of its own: the processes ``launch`` spawns unpickle it
by module name, and a test module's name under pytest's importlib mode ("tests.engine...") is taken by any regular
package called ``tests`` on sys.path (a source checkout of detectron2 installed in editable mode has one). The test
puts this folder on sys.path, so the workers import it as ``distributed_train_worker``."""


def train_worker(config, opts, output_dir, out_file):
    import torch
    from detectron2.utils import comm

    from d2_refine.utils.testing import smoke_trainer

    trainer = smoke_trainer(config, output_dir, opts)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    torch.save({"world_size": comm.get_world_size(), "state": model.state_dict(),
                "params": [name for name, _ in model.named_parameters()],
                "results": trainer._last_eval_results if comm.is_main_process() else None},
               f"{out_file}.{comm.get_rank()}")
