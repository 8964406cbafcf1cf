"""Distillation plumbing on a tiny random Llama: teacher data, draft initialisation, training, resume, saving."""

import pytest
import torch
from draft_fixtures import EOS_ID, VOCAB_SIZE, prompts, tiny_target, tiny_tokenizer
from transformers import AutoModelForCausalLM

from hf_specdec import data, distill, draft_quality
from hf_specdec.cli import build_parser
from hf_specdec.draft_model import ReducedVocabLlamaForCausalLM

KEPT = [0, 1, 2] + list(range(3, VOCAB_SIZE, 2))  # special tokens + every other word


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def samples(target, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("teacher")
    return distill.generate_teacher_data(target, tiny_tokenizer(), prompts(12), out, batch_size=5, max_new_tokens=10, seed=0)


def test_teacher_data_records_the_exact_target_distribution(target, samples):
    assert len(samples) == 12
    head = target.get_output_embeddings()
    for sample in samples:
        generated = sample.token_ids[sample.prompt_len :]
        assert 1 <= len(generated) <= 10 and not (generated[:-1] == EOS_ID).any()
        with torch.no_grad():
            logits = target(sample.token_ids[None].long()).logits[0]
        positions = torch.arange(sample.prompt_len - 1, len(sample.token_ids) - 1)
        expected = torch.log_softmax(logits[positions], dim=-1)
        recorded = torch.log_softmax(head(sample.hidden), dim=-1)
        torch.testing.assert_close(recorded, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sample.logsumexp, logits[positions].logsumexp(-1), atol=1e-4, rtol=1e-4)


def test_teacher_data_is_reused_from_disk(target, tmp_path):
    first = distill.generate_teacher_data(target, tiny_tokenizer(), prompts(3), tmp_path, 2, 6, seed=0)
    again = distill.generate_teacher_data(None, tiny_tokenizer(), prompts(3), tmp_path, 2, 6, seed=0)
    assert [s.token_ids.tolist() for s in again] == [s.token_ids.tolist() for s in first]


def test_kept_tokens_are_the_most_probable_plus_specials(target, samples):
    head = target.get_output_embeddings()
    kept = distill.choose_kept_tokens(samples, head, 10, always_keep=[0, 1, 2])
    assert len(kept) == 10 and kept == sorted(kept) and {0, 1, 2} <= set(kept)
    mass = torch.softmax(head(torch.cat([s.hidden for s in samples])), dim=-1).sum(0).detach()
    assert mass[kept].sum() >= mass.topk(7).values.sum() + mass[[0, 1, 2]].sum() - 1e-3


def test_draft_with_all_tokens_and_layers_reproduces_the_target(target):
    draft = distill.init_draft_from_target(target, list(range(VOCAB_SIZE)), [0, 1, 2], oov_rank=4).eval()
    tokens = torch.randint(VOCAB_SIZE, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(draft(tokens).logits, target(tokens).logits)


def test_training_lowers_the_kl_and_resumes_where_it_stopped(target, samples, tmp_path, monkeypatch):
    def fresh_draft():
        return distill.init_draft_from_target(target, KEPT, [0, 2], oov_rank=4)

    teacher_head = distill.head_rows(target.get_output_embeddings(), KEPT)
    batch = distill.collate(samples, pad_token_id=0)
    options = distill.TrainingOptions(steps=6, batch_size=4, lr=3e-3, warmup_steps=1, checkpoint_every=3)

    straight = fresh_draft()
    with torch.no_grad():
        kl_before = distill.distillation_loss(straight, teacher_head, batch).item()
    distill.train_draft(straight, teacher_head, samples, options, tmp_path / "straight.pt", False, 0)
    with torch.no_grad():
        assert distill.distillation_loss(straight, teacher_head, batch).item() < kl_before

    class Crash(Exception):
        pass

    def save_then_crash(*args):
        save_checkpoint(*args)
        raise Crash

    save_checkpoint = distill._save_checkpoint
    monkeypatch.setattr(distill, "_save_checkpoint", save_then_crash)
    with pytest.raises(Crash):  # killed right after the step-3 checkpoint
        distill.train_draft(fresh_draft(), teacher_head, samples, options, tmp_path / "resumed.pt", False, 0)
    monkeypatch.setattr(distill, "_save_checkpoint", save_checkpoint)
    resumed = distill.draft_from_checkpoint(tmp_path / "resumed.pt")
    distill.train_draft(resumed, teacher_head, samples, options, tmp_path / "resumed.pt", True, 0)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_saved_draft_loads_as_a_full_vocabulary_causal_lm(target, tmp_path):
    draft = distill.init_draft_from_target(target, KEPT, [1], oov_rank=4).eval()
    distill.save_draft(draft, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ReducedVocabLlamaForCausalLM) and loaded.config.kept_token_ids == KEPT
    tokens = torch.randint(VOCAB_SIZE, (1, 7))
    with torch.no_grad():
        for parameter in draft.parameters():  # what the fp16 file holds
            parameter.copy_(parameter.half().float())
        logits, expected = loaded(tokens).logits, draft(tokens).logits
    outside = torch.ones(VOCAB_SIZE, dtype=torch.bool)
    outside[KEPT] = False
    assert logits.shape == (1, 7, VOCAB_SIZE) and logits.dtype == torch.float32
    assert torch.isneginf(logits[..., outside]).all() and torch.isfinite(logits[..., KEPT]).all()
    torch.testing.assert_close(logits[..., KEPT], expected[..., KEPT])


def test_cli_distill_help_lists_the_options():
    help_text = build_parser()._subparsers._group_actions[0].choices["distill"].format_help()
    for option in ("--target", "--prompts", "--steps", "--lr", "--batch-size", "--out", "--seed", "--resume"):
        assert option in help_text


def test_teacher_data_from_other_prompts_is_refused(target, tmp_path):
    distill.generate_teacher_data(target, tiny_tokenizer(), prompts(2), tmp_path, 2, 4, seed=0)
    with pytest.raises(ValueError, match="other prompts or settings"):
        distill.generate_teacher_data(target, tiny_tokenizer(), prompts(2, seed=1), tmp_path, 2, 4, seed=0)


def test_sharegpt_split_is_disjoint_fixed_and_about_ten_percent_held_out():
    train, heldout = data.user_messages("train"), data.user_messages("heldout")
    assert not set(train) & set(heldout)
    assert 0.08 < len(heldout) / (len(train) + len(heldout)) < 0.12
    assert heldout[0] == data.user_messages("heldout")[0] and all(len(m) >= data.MIN_PROMPT_CHARS for m in heldout)


def test_a_draft_equal_to_its_target_is_always_accepted(target, samples):
    draft = distill.init_draft_from_target(target, list(range(VOCAB_SIZE)), [0, 1, 2], oov_rank=4).eval()
    stats = draft_quality.acceptance(draft, target.get_output_embeddings(), samples)
    assert stats["alpha"] == pytest.approx(1.0, abs=1e-5) and stats["top1_agreement"] == 1.0
    assert stats["positions"] == sum(s.generated_len for s in samples)
    assert draft_quality.chain_block_efficiency(1.0, 4) == 5 and draft_quality.chain_block_efficiency(0.5, 1) == 1.5
    cost = draft_quality.relative_cost(draft, target, token_counts=(1, 4), past_len=8)
    assert set(cost) == {"1", "4"} and all(c["ratio"] > 0 for c in cost.values())
