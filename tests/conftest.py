"""Shared fixtures: a tiny random Llama (built once into the hf_memkit cache) and a small dataset."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite runs in one process with the stock allocator (a fixed glibc mmap threshold would slow every test);
# tests/memory/test_host_memory.py checks the allocator settings in their own processes
os.environ.setdefault("HF_MEMKIT_ALLOCATOR", "system")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one intra-op thread each (and in the processes they start), or
    # OpenMP's spin-waits across busy cores cost more than the threads save (see hf_memkit/quant/threads.py)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
logging.getLogger("hf_memkit").setLevel(logging.INFO)


def pytest_collection_modifyitems(config, items):
    """Under xdist, the end-to-end tests (``slow``: child processes, launchers, two ranks) go out first, so the
    workers finish on short tests instead of one worker running a 100 s test alone at the end (stable order
    otherwise, the same in every worker, as xdist requires)."""
    if hasattr(config, "workerinput"):  # an xdist worker (the collection that is scheduled)
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def _freeze_import_time_objects():
    """The libraries' import-time objects (torch, transformers, PEFT: millions of them) go to the collector's
    permanent generation. accelerate calls ``gc.collect()`` at every ``Trainer.train()``, which otherwise walks them
    all: measured 0.29 s of a 0.5 s tiny-model training run, half the composition matrix's time."""
    import gc

    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    if os.environ.get("PYTEST_XDIST_WORKER"):  # in case a plugin imported torch before the environment was set
        torch.set_num_threads(1)
    from transformers import Trainer  # noqa: F401

    import hf_memkit.integrations.trainer  # noqa: F401

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def tiny_path():
    from hf_memkit.data.models import tiny_dir

    return tiny_dir()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture
def tiny_model(tiny_path):
    """A fresh copy of the tiny model for every test (tests mutate it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path)


@pytest.fixture(scope="session")
def tiny_dataset(tiny_tokenizer):
    from hf_memkit.data.corpus import block_dataset, split_topics

    train, _ = split_topics()
    return block_dataset(train, tiny_tokenizer, 32, max_blocks=64)


def make_args(output_dir, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=4, report_to=[],
                save_strategy="no", logging_steps=1, learning_rate=1e-2, seed=0, dataloader_pin_memory=False,
                disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def measure_one_step(model, dataset, recipe, output_dir, batch_size=4, seq_len=32):
    """Train one step under ``recipe`` with the memory profiler; return (estimate dict, measured report)."""
    from hf_memkit import MemkitTrainer, estimate_memory
    from hf_memkit.memory.profiler import MemoryReportCallback

    cb = MemoryReportCallback()
    trainer = MemkitTrainer(model=model, args=make_args(output_dir, max_steps=1, per_device_train_batch_size=batch_size),
                            train_dataset=dataset, callbacks=[cb], recipe=recipe)
    est = estimate_memory(model.config, recipe, batch_size=batch_size, seq_len=seq_len).to_dict()
    trainer.train()
    return est, cb.report()
