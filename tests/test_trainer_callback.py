"""LightPeftCallback in an unmodified transformers.Trainer vs prunetune's own loop; the model-object API;
AutoPrunedModel; the README's "Use it in your own Trainer script" block."""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import make_tokenizer
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import prunetune
from prunetune.data import make_collate
from prunetune.errors import PrunetuneError

POS = ["the movie was good and the actors were great", "one of the best films of the year .",
       "a charming and often affecting journey"]
NEG = ["the plot is bad , boring and too long", "it is not a film i would watch again"]
ROWS, BS, EPOCHS = 32, 4, 3  # 8 steps per epoch, 24 in all
# max_grad_norm 1e-3: every step is clipped (gradient norms here are ~5e-3), so scores taken from clipped
# gradients would differ from the own loop's (checked: the equality test fails without the unclipped copies)
CFG = {"peft": {"r": 4, "alpha": 8, "dropout": 0.0},
       "train": {"lr": 5e-3, "batch_size": BS, "epochs": EPOCHS, "warmup_ratio": 0.0, "weight_decay": 0.01,
                 "max_grad_norm": 1e-3, "seed": 0, "eval_each_epoch": False, "log_every": 1},
       "estimate": {"steps": 6, "window": 0.5, "lambda_heads": 1e-2, "lambda_ffn": 1e-2},
       "prune": {"heads": 0.5, "ffn": 0.3, "modules": 0.3, "ranks": 0.3}}


def rows(tok, n=ROWS):
    out = []
    for i in range(n):
        text, label = (POS[i % 3], 1) if i % 2 == 0 else (NEG[i % 2], 0)
        enc = tok(text if i % 4 else text + " " + text)  # two lengths: batches need padding
        out.append({**enc, "labels": label})
    return out


def tiny_model(tok):
    torch.manual_seed(0)  # no dropout anywhere: both loops draw nothing from the RNG
    return BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def trainer_args(tmp_path, max_grad_norm=1e-3, **kw):
    t = CFG["train"]
    return TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=BS, num_train_epochs=EPOCHS,
        learning_rate=t["lr"], weight_decay=t["weight_decay"], max_grad_norm=max_grad_norm, warmup_steps=0,
        lr_scheduler_type="linear", optim="adamw_torch", train_sampling_strategy="sequential", logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True, **kw)


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer(POS + NEG)
    data = rows(tok)
    peft_model = prunetune.with_peft(tiny_model(tok), CFG)
    return tok, data, peft_model


def run_both(setup, tmp, cfg):
    """The same PeftModel, data order (sequential), collation and seed through the Trainer + callback and
    through prunetune's own loop (light_peft_model with a DataLoader): (trainer, callback, own result)."""
    import datasets

    tok, data, peft_model = setup
    collate = make_collate(tok)
    cb = prunetune.LightPeftCallback(cfg)
    trainer = Trainer(model=copy.deepcopy(peft_model), args=trainer_args(tmp), data_collator=collate,
                      train_dataset=datasets.Dataset.from_list(data), callbacks=[cb], processing_class=tok)
    trainer.train()
    loader = torch.utils.data.DataLoader(data, batch_size=BS, shuffle=False, collate_fn=collate)
    own = prunetune.light_peft_model(copy.deepcopy(peft_model), loader, config=cfg)
    return trainer, cb, own


@pytest.fixture(scope="module")
def both(setup, tmp_path_factory):  # noqa: D401
    tmp = tmp_path_factory.mktemp("cb")
    return (*run_both(setup, tmp, CFG), tmp)


def test_trainer_callback_gives_the_plan_of_the_own_loop(both):
    trainer, cb, own, _ = both
    a, b = cb.plan, own.plan
    assert a.kept_heads == b.kept_heads and a.kept_neurons == b.kept_neurons
    assert a.peft_ranks == b.peft_ranks and a.peft_orig_ranks == b.peft_orig_ranks
    # the scores behind it agree bit for bit: same steps, masks, L1 gradient, unclipped gradients
    for key in ("head_masks", "head_taylor", "rank_importance", "module_importance", "ffn_mask_summary"):
        assert a.meta[key] == b.meta[key], key
    assert a.heads_pruned() and a.ffn_pruned() and len(a.peft_ranks) < len(a.peft_orig_ranks)


def test_trainer_carries_on_after_in_place_surgery(both):
    trainer, cb, own, _ = both
    model = trainer.model
    assert model is cb.result().model  # the Trainer's own object holds the pruned model
    hf = model.base_model.model
    assert hf.bert.encoder.layer[0].attention.self.query.base_layer.out_features < 32
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_opt == trainable  # the masks left, every surviving trainable parameter is there
    for p, st in opt.state.items():
        assert st["exp_avg"].shape == p.shape
    sched = trainer.lr_scheduler.scheduler if hasattr(trainer.lr_scheduler, "scheduler") else trainer.lr_scheduler
    assert len(sched.base_lrs) == len(opt.param_groups)
    assert trainer.state.global_step == ROWS // BS * EPOCHS
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > cb.window.steps]
    assert len(losses) >= 12
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # fine-tuning the pruned model still learns


def test_callback_export_reloads(both, setup):
    from transformers import AutoTokenizer

    trainer, cb, own, tmp = both
    tok, data, _ = setup
    out = cb.save(tmp / "export", tokenizer=tok)
    loaded = prunetune.AutoPrunedModel.from_pretrained(out)
    assert type(loaded).__name__ == "PeftModel" and loaded.prunetune_plan.kept_heads == cb.plan.kept_heads
    tok2 = AutoTokenizer.from_pretrained(out)
    batch = make_collate(tok2)([{k: v for k, v in r.items()} for r in data[:5]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trainer.model(**batch).logits, atol=1e-5, rtol=0)
    # trainer.save_model: the adapter as usual, plus the export AutoPrunedModel and AutoTokenizer load
    trainer.save_model(str(tmp / "saved"))
    assert (tmp / "saved" / "adapter_model.safetensors").is_file()
    via_trainer = prunetune.AutoPrunedModel.from_pretrained(tmp / "saved")
    batch = make_collate(AutoTokenizer.from_pretrained(tmp / "saved"))([dict(r) for r in data[:5]])
    with torch.no_grad():
        torch.testing.assert_close(via_trainer(**batch).logits, trainer.model(**batch).logits, atol=1e-5, rtol=0)
    # the own loop's result saves the same way
    own_out = own.save(tmp / "own_export", tokenizer=tok)
    assert prunetune.AutoPrunedModel.from_pretrained(own_out).prunetune_plan.kept_heads == own.plan.kept_heads


def test_importance_is_taken_from_unclipped_gradients(setup, tmp_path):
    """A window of step 0 only: its gradients do not depend on clipping, so neither may the scores."""
    import datasets

    tok, data, peft_model = setup
    peft_model = copy.deepcopy(peft_model)
    g = torch.Generator().manual_seed(5)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B = 0 at the start would make every rank score 0 at step 0
            p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
    metas = []
    for norm in (0.0, 1e-4):
        cb = prunetune.LightPeftCallback(CFG, estimate__steps=1)
        trainer = Trainer(model=copy.deepcopy(peft_model), args=trainer_args(tmp_path, max_grad_norm=norm,
                                                                              max_steps=3),
                          data_collator=make_collate(tok), train_dataset=datasets.Dataset.from_list(data),
                          callbacks=[cb])
        trainer.train()
        metas.append(cb.plan.meta)
    assert metas[0]["window_start"] == 0 and metas[0]["estimation_steps"] == 1
    assert metas[0]["rank_importance"] == metas[1]["rank_importance"]
    assert metas[0]["module_importance"] == metas[1]["module_importance"]
    assert any(v > 0 for r in metas[0]["rank_importance"].values() for v in r)


def test_callback_refuses_ddp_and_non_peft_models(setup):
    tok, _data, peft_model = setup
    cb = prunetune.LightPeftCallback(CFG)
    with pytest.raises(PrunetuneError, match="data-parallel"):
        cb.on_train_begin(SimpleNamespace(world_size=2), SimpleNamespace(max_steps=10, global_step=0), None,
                          model=peft_model)
    with pytest.raises(PrunetuneError, match="PeftModel"):
        cb.on_train_begin(SimpleNamespace(world_size=1), SimpleNamespace(max_steps=10, global_step=0), None,
                          model=tiny_model(tok))
    with pytest.raises(PrunetuneError, match="fp16"):
        cb.on_train_begin(SimpleNamespace(world_size=1, fp16=True), SimpleNamespace(max_steps=10, global_step=0),
                          None, model=peft_model)
    with pytest.raises(PrunetuneError, match="cannot resume"):
        cb.on_train_begin(SimpleNamespace(world_size=1), SimpleNamespace(max_steps=10, global_step=3), None,
                          model=peft_model, train_dataloader=SimpleNamespace(dataset=list(range(40))))
    with pytest.raises(PrunetuneError, match="peft.kind=lora, not 'adapter'.*light_peft_model"):
        prunetune.LightPeftCallback(CFG, peft__kind="adapter")
    with pytest.raises(PrunetuneError, match="no plan yet"):
        cb.result()


def test_model_object_api_with_a_datasets_dataset(setup):
    import datasets

    tok, data, _ = setup
    ds = datasets.Dataset.from_list(data)
    res = prunetune.light_peft_model(tiny_model(tok), ds, dev_data=ds, tokenizer=tok, config=CFG,
                                     train__epochs=1)
    assert isinstance(res, prunetune.LightResult) and isinstance(res.plan, prunetune.PruningPlan)
    assert "accuracy" in res.metrics["final"] and res.metrics["estimation_steps"] == 6
    assert "_plan" not in res.metrics and "_model" not in res.metrics
    assert type(res.model).__name__ == "PeftModel"
    with pytest.raises(PrunetuneError):
        prunetune.light_peft_model(tiny_model(tok), [], config=CFG)
    # no dev data: no evaluation (eval_each_epoch is ignored), the plan and model all the same
    res = prunetune.light_peft_model(tiny_model(tok), data, tokenizer=tok, config=CFG, train__epochs=1,
                                     train__eval_each_epoch=True)
    assert res.metrics["evals"] == [] and res.plan.heads_pruned()


def test_auto_pruned_model_loads_merged_exports(setup, tmp_path):
    tok, data, _ = setup
    res = prunetune.light_peft_model(tiny_model(tok), data, tokenizer=tok, config=CFG, train__epochs=1)
    folder = res.save(tmp_path / "merged", tokenizer=tok, merge=True)
    model = prunetune.AutoPrunedModel.from_pretrained(folder)
    assert type(model).__name__ == "BertForSequenceClassification"  # the HF model itself, LoRA folded in
    batch = make_collate(tok)(data[:4])
    res.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, res.model(**batch).logits, atol=1e-5, rtol=0)


def test_auto_pruned_model_refuses_a_non_export(tmp_path):
    with pytest.raises(PrunetuneError, match="not a prunetune export"):
        prunetune.AutoPrunedModel.from_pretrained(tmp_path)


def test_public_api_doctests():
    import doctest

    import importlib

    from prunetune.integrations import trainer
    from prunetune.methods import light_peft
    from prunetune import plan

    load = importlib.import_module("prunetune.export.load")
    for module in (plan, load, trainer, light_peft):
        failed, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert failed == 0 and tried > 0, module.__name__


def test_readme_trainer_section_runs(tmp_path, monkeypatch):
    """The README's "Use it in your own Trainer script" code block, executed as it stands."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Use it in your own Trainer script", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    env = {"__name__": "__readme__"}
    exec(compile(block, "README.md", "exec"), env)  # noqa: S102 - our own README
    assert isinstance(env["callback"].plan, prunetune.PruningPlan)
    assert os.path.isdir(tmp_path / "pruned")


DDP_SCRIPT = '''
import sys, torch, prunetune
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32))
rows = [{"input_ids": torch.randint(1, 40, (6,)), "attention_mask": torch.ones(6, dtype=torch.long),
         "labels": i % 2} for i in range(16)]
callback = prunetune.LightPeftCallback(estimate={"steps": 2})
trainer = Trainer(model=prunetune.with_peft(model), train_dataset=rows, callbacks=[callback],
                  args=TrainingArguments(sys.argv[1], per_device_train_batch_size=4, max_steps=4, use_cpu=True,
                                         ddp_backend="gloo", report_to="none", save_strategy="no"))
try:
    trainer.train()
except prunetune.PrunetuneError as exc:  # one file per rank: two ranks' prints can interleave on stdout
    import os
    import pathlib

    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"refused-{os.environ['RANK']}.txt").write_text(f"REFUSED: {exc}")
    sys.exit(0)
print("TRAINED", flush=True)
sys.exit(1)
'''


@pytest.mark.skipif(__import__("shutil").which("torchrun") is None, reason="torchrun not installed")
def test_callback_refuses_a_real_two_process_ddp_run(tmp_path):
    """torchrun, 2 CPU processes, gloo: both ranks stop at train begin with the one clear error."""
    import subprocess

    script = tmp_path / "ddp_callback.py"
    script.write_text(DDP_SCRIPT)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    texts = [(tmp_path / "o" / f"refused-{rank}.txt").read_text() for rank in (0, 1)]
    assert all(t.startswith("REFUSED: LightPeftCallback does not support data-parallel training") for t in texts)
    assert "TRAINED" not in proc.stdout


def test_callback_path_scores_and_merge_match_the_own_loop(setup, tmp_path):
    """module_score=path needs unclipped gradients from step 0 (not only the window): same path scores and plan
    through the Trainer as through the own loop; merge_removed goes through the same surgery."""
    cfg = copy.deepcopy(CFG)
    cfg["estimate"]["module_score"] = "path"
    cfg["prune"]["merge_removed"] = True
    _trainer, cb, own = run_both(setup, tmp_path, cfg)
    a, b = cb.plan, own.plan
    assert a.meta["module_score"] == "path" and any(v > 0 for v in a.meta["module_path"].values())
    assert a.meta["module_path"] == b.meta["module_path"] and a.meta["rank_importance"] == b.meta["rank_importance"]
    assert a.peft_ranks == b.peft_ranks and a.kept_heads == b.kept_heads


def test_callback_compensation_matches_the_own_loop(setup, tmp_path):
    """prune.compensate through the Trainer: the window means are taken on the same tokens (padding left out
    through the captured attention mask), so the compensated biases equal the own loop's."""
    cfg = copy.deepcopy(CFG)
    cfg["prune"]["compensate"] = True
    trainer, cb, own = run_both(setup, tmp_path, cfg)
    assert cb.estimate.means is not None
    a, b = trainer.model.base_model.model, own.model.base_model.model
    layer = a.bert.encoder.layer[0]

    def named(model):  # LoRA-wrapped or not after surgery: one name per base tensor
        return {n.replace(".base_layer", ""): p for n, p in model.named_parameters()}

    biases = {n: p for n, p in named(a).items() if n.endswith("bias") and ("output.dense" in n)}
    assert biases and all(torch.equal(p, named(b)[n]) for n, p in biases.items())
    _, _, peft_model = setup
    original = named(peft_model.base_model.model)
    changed = [n for n, p in biases.items() if not torch.equal(p, original[n])]
    assert any("attention.output" in n for n in changed) and any(".output.dense" in n and "attention" not in n
                                                                  for n in changed)
    assert layer.attention.self.query.base_layer.out_features < 32


def test_callback_reconstruction_matches_the_own_loop(setup, tmp_path):
    """prune.reconstruct through the Trainer: the window's moments are taken on the same tokens, so the
    reconstructed o / down weights equal the own loop's (and differ from the unpruned model's kept columns)."""
    cfg = copy.deepcopy(CFG)
    cfg["prune"]["reconstruct"] = True
    trainer, cb, own = run_both(setup, tmp_path, cfg)
    assert cb.plan.meta["compensation"]["reconstruct"] and cb.estimate.moments is None  # used, then freed
    a, b = trainer.model.base_model.model, own.model.base_model.model

    def named(model):  # LoRA-wrapped or not after surgery: one name per base tensor
        return {n.replace(".base_layer", ""): p for n, p in model.named_parameters()}

    weights = {n: p for n, p in named(a).items() if n.endswith("output.dense.weight")}
    assert weights and all(torch.allclose(p, named(b)[n], atol=1e-6, rtol=0) for n, p in weights.items())
    _, _, peft_model = setup
    original = named(peft_model.base_model.model)
    cut = [i for i, kept in enumerate(cb.plan.kept_neurons) if len(kept) < cb.arch.intermediate_size]
    assert cut
    for i in cut:  # the kept columns absorbed the removed neurons' part: not the unpruned model's columns
        name = f"bert.encoder.layer.{i}.output.dense.weight"
        assert not torch.allclose(named(a)[name], original[name][:, cb.plan.kept_neurons[i]], atol=1e-4)
