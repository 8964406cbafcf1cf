"""Teacher data by teacher forcing, vocabulary choice, both draft kinds' initialisation, training, resume, saving and
measurement, on a tiny random Llama with a word-level chat template."""

import json
import re

from dataclasses import replace

import pytest
import torch
from draft_fixtures import VOCAB_SIZE, tiny_target
from feature_fixtures import chat_tokenizer, exact_feature_pair, sampled_chats
from transformers import AutoModelForCausalLM

from hf_specdec import data, distill, draft_quality, teacher
from hf_specdec.cli import build_parser
from hf_specdec.cli import main as cli_main
from hf_specdec.draft_model import ReducedVocabLlamaForCausalLM

KEPT = [0, 1, 2] + list(range(3, VOCAB_SIZE, 2))  # special tokens + every other word


@pytest.fixture(scope="module")
def target():
    return tiny_target()


@pytest.fixture(scope="module")
def chats(target):
    return sampled_chats(target, 40, length=20)


def build(target, chats, directory, positions=900):
    return teacher.build_teacher_data(target, chat_tokenizer(VOCAB_SIZE), directory, positions=positions, max_tokens=40,
                                      shard_positions=256, chats=chats, log=lambda *args: None)


@pytest.fixture(scope="module")
def teacher_data(target, chats, tmp_path_factory):
    return build(target, chats, tmp_path_factory.mktemp("teacher"))


def test_teacher_forcing_stores_the_targets_lm_head_input_at_every_position(target, teacher_data):
    assert teacher_data.positions >= 900 and len(teacher_data.manifest["shards"]) > 1
    head = target.get_output_embeddings()
    for i in range(len(teacher_data)):
        sequence = teacher_data[i]
        assert sequence.features.dtype == torch.float16 and len(sequence.features) == len(sequence.tokens) <= 40
        with torch.no_grad():
            logits = target(sequence.tokens[None].long()).logits[0]
            torch.testing.assert_close(head(sequence.features.float()), logits, atol=2e-2, rtol=1e-2)


def test_assistant_tokens_are_the_replies_and_their_end_of_turn():
    tokenizer = chat_tokenizer(VOCAB_SIZE)
    chat = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7 w8 w9"},
            {"role": "user", "content": "w10"}, {"role": "assistant", "content": "w11"}]
    ids, assistant = teacher.tokenize_conversation(tokenizer, chat, max_tokens=100)
    words = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert words == "<s> w3 w5 w6 </s> <s> w4 w7 w8 w9 </s> <s> w3 w10 </s> <s> w4 w11 </s>".split()
    assert [w for w, a in zip(words, assistant) if a] == ["w7", "w8", "w9", "</s>", "w11", "</s>"]
    cut_ids, cut_assistant = teacher.tokenize_conversation(tokenizer, chat, max_tokens=8)
    assert cut_ids.tolist() == ids[:8].tolist() and cut_assistant.tolist() == assistant[:8].tolist()
    assert teacher.tokenize_conversation(tokenizer, chat, max_tokens=6) is None  # no assistant token left


def test_teacher_data_resumes_and_refuses_another_recipe(target, chats, teacher_data, tmp_path):
    first = build(target, chats, tmp_path)
    shards = first.manifest["shards"]
    saved = (tmp_path / shards[1]).read_bytes()
    (tmp_path / shards[1]).unlink()  # as if the run had been killed there
    again = build(target, chats, tmp_path)
    assert (tmp_path / shards[1]).read_bytes() == saved and len(again) == len(first)
    with pytest.raises(ValueError, match="another recipe"):
        build(target, chats, tmp_path, positions=500)
    with pytest.raises(ValueError, match="another recipe"):  # same config, other weights
        build(tiny_target(seed=1), chats, tmp_path)
    manifest = json.loads((tmp_path / teacher.MANIFEST).read_text())  # data written before the weights were recorded
    del manifest["recipe"]["target_weights"]
    (tmp_path / teacher.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not say which target's weights wrote it.*add \"target_weights\""):
        build(target, chats, tmp_path)


def test_kept_tokens_are_the_most_probable_plus_specials(target, teacher_data):
    head = target.get_output_embeddings()
    kept = distill.choose_kept_tokens(teacher_data, head, 10, always_keep=[0, 1, 2])
    assert len(kept) == 10 and kept == sorted(kept) and {0, 1, 2} <= set(kept)
    features = torch.cat([teacher_data[i].features[:-1][teacher_data[i].assistant[1:]] for i in range(len(teacher_data))])
    with torch.no_grad():
        mass = torch.softmax(head(features.float()), dim=-1).sum(0)
    assert mass[kept].sum() >= mass.topk(7).values.sum() + mass[[0, 1, 2]].sum() - 1e-2


def test_standalone_draft_with_all_tokens_and_layers_reproduces_the_target(target):
    draft = distill.init_standalone_draft(target, list(range(VOCAB_SIZE)), [0, 1, 2], oov_rank=4).eval()
    tokens = torch.randint(VOCAB_SIZE, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(draft(tokens).logits, target(tokens).logits)


def test_unrolled_masks_follow_a_draft_tree_chain():
    mask = distill.unrolled_mask(6, 3, "cpu")  # step 3: query t is the depth-2 node under the root t - 2
    assert mask.shape == (6, 18)
    t = 4
    assert mask[t, :6].nonzero().flatten().tolist() == [0, 1, 2]  # true-feature keys up to the root
    assert mask[t, 6:12].nonzero().flatten().tolist() == [3]  # the depth-1 node of its chain
    assert mask[t, 12:].nonzero().flatten().tolist() == [4]  # itself


def test_unrolled_feature_predictions_are_what_the_loop_computes():
    """Step k of the unrolled forward at t equals the draft run as the loop runs it: the true-feature prefix up to
    t - k + 1 in the cache, then a chain of its own predicted features."""
    target, draft = exact_feature_pair(vocab_size=VOCAB_SIZE)
    torch.nn.init.normal_(draft.model.fuse.weight, std=0.3)  # make the draft read its features
    tokens = torch.randint(3, VOCAB_SIZE, (1, 10))
    features = teacher.lm_head_inputs(target, tokens[0])[None]
    with torch.no_grad():
        unrolled = distill.feature_unrolled(draft, tokens, features, 3)
        root = 5
        inputs = torch.nn.functional.pad(features, (0, 0, 1, 0))[:, :-1]
        hidden = draft(tokens[:, : root + 1], inputs[:, : root + 1]).features[:, -1:]
        torch.testing.assert_close(unrolled[0][:, root], hidden[:, 0], atol=1e-5, rtol=1e-5)
        chain_tokens, chain_features = tokens[:, : root + 1], inputs[:, : root + 1]
        for step in (2, 3):
            chain_tokens = torch.cat([chain_tokens, tokens[:, root + step - 1 : root + step]], 1)
            chain_features = torch.cat([chain_features, hidden], 1)
            hidden = draft(chain_tokens, chain_features).features[:, -1:]
            torch.testing.assert_close(unrolled[step - 1][:, root + step - 1], hidden[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("draft_type", distill.DRAFT_TYPES)
def test_training_lowers_the_kl_and_resumes_where_it_stopped(draft_type, target, teacher_data, tmp_path, monkeypatch):
    def fresh_draft():
        if draft_type == "feature":
            return distill.init_feature_draft(target, KEPT, 1, oov_rank=4)
        return distill.init_standalone_draft(target, KEPT, [0, 2], oov_rank=4)

    teacher_head = distill.head_rows(target.get_output_embeddings(), KEPT)
    batch = distill.collate([teacher_data[i] for i in range(4)])
    options = distill.TrainingOptions(steps=6, batch_tokens=160, lr=3e-3, warmup_steps=1, checkpoint_every=3,
                                      bf16_autocast=False)

    def kl(draft):
        with torch.no_grad():
            return distill.loss_for(draft)(draft, teacher_head, batch).item()

    straight = fresh_draft()
    kl_before = kl(straight)
    distill.train_draft(straight, teacher_head, teacher_data, options, tmp_path / "straight.pt", False)
    assert kl(straight) < kl_before

    class Crash(Exception):
        pass

    def save_then_crash(*args):
        save_checkpoint(*args)
        raise Crash

    save_checkpoint = distill._save_checkpoint
    monkeypatch.setattr(distill, "_save_checkpoint", save_then_crash)
    with pytest.raises(Crash):  # killed right after the step-3 checkpoint
        distill.train_draft(fresh_draft(), teacher_head, teacher_data, options, tmp_path / "resumed.pt", False)
    monkeypatch.setattr(distill, "_save_checkpoint", save_checkpoint)
    resumed = distill.draft_from_checkpoint(tmp_path / "resumed.pt")
    assert type(resumed) is type(straight)
    # options that would not apply to the resumed run are refused, not ignored
    for changed, message in [(dict(lr=1e-3), "lr=0.003 \\(now 0.001\\)"), (dict(seed=1), "seed=0"),
                             (dict(batch_tokens=200), "batch_tokens=160"), (dict(steps=2), "pass --steps 3 or more")]:
        with pytest.raises(ValueError, match=message):
            distill.train_draft(distill.draft_from_checkpoint(tmp_path / "resumed.pt"), teacher_head, teacher_data,
                                replace(options, **changed), tmp_path / "resumed.pt", True)
    with pytest.raises(ValueError, match="no checkpoint at"):
        distill.train_draft(fresh_draft(), teacher_head, teacher_data, options, tmp_path / "absent.pt", True)
    distill.train_draft(resumed, teacher_head, teacher_data, options, tmp_path / "resumed.pt", True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_resumed_draft_refuses_options_that_describe_another(target):
    feature = distill.init_feature_draft(target, KEPT, 1, oov_rank=4)
    distill.check_draft_options(feature, "feature", 1, len(KEPT), 4)
    for given, message in [(("standalone", 1, len(KEPT), 4), "--draft-type feature \\(given standalone\\)"),
                           (("feature", 2, len(KEPT), 4), "--layers \\(count\\) 1 \\(given 2\\)"),
                           (("feature", 1, 99, 4), "--vocab-size"), (("feature", 1, len(KEPT), 32), "--oov-rank 4")]:
        with pytest.raises(ValueError, match=message):
            distill.check_draft_options(feature, *given)
    standalone = distill.init_standalone_draft(target, KEPT, [0, 2], oov_rank=4)
    distill.check_draft_options(standalone, "standalone", 2, len(KEPT), 4)


@pytest.mark.parametrize("draft_type", distill.DRAFT_TYPES)
def test_a_saved_draft_trains_further_from_its_own_weights(draft_type, target, teacher_data, tmp_path):
    """`--init-from`: the saved draft's weights (fp16, as shipped) and vocabulary, its logit scale back at 1, options
    that describe another draft refused; training then starts from it and lowers its KL."""
    if draft_type == "feature":
        saved = distill.init_feature_draft(target, KEPT, 1, oov_rank=4)
    else:
        saved = distill.init_standalone_draft(target, KEPT, [0, 2], oov_rank=4)
    saved.config.logit_scale = saved.lm_head.logit_scale = 1.1
    distill.save_draft(saved, tmp_path / "saved")
    draft = distill.pretrained_draft(tmp_path / "saved", target)
    assert type(draft) is type(saved) and draft.config.kept_token_ids == KEPT
    assert draft.config.logit_scale == draft.lm_head.logit_scale == 1.0
    for (name, a), b in zip(saved.state_dict().items(), draft.state_dict().values()):
        torch.testing.assert_close(b, a.half().float() if a.is_floating_point() else a, msg=name)
    layers = 1 if draft_type == "feature" else 2
    distill.check_draft_options(draft, draft_type, layers, len(KEPT), 4, source="saved", fix="fix")
    with pytest.raises(ValueError, match="saved has --oov-rank 4 \\(given 32\\): fix"):
        distill.check_draft_options(draft, draft_type, layers, len(KEPT), 32, source="saved", fix="fix")
    teacher_head = distill.head_rows(target.get_output_embeddings(), KEPT)
    batch = distill.collate([teacher_data[i] for i in range(4)])
    with torch.no_grad():
        before = distill.loss_for(draft)(draft, teacher_head, batch).item()
    options = distill.TrainingOptions(steps=4, batch_tokens=160, lr=3e-3, warmup_steps=1, checkpoint_every=4,
                                      bf16_autocast=False)
    distill.train_draft(draft, teacher_head, teacher_data, options, tmp_path / "tuned.pt", False)
    with torch.no_grad():
        assert distill.loss_for(draft)(draft, teacher_head, batch).item() < before


def test_a_saved_draft_for_another_target_is_refused(target, tmp_path):
    from tiny_models import tiny_model

    other = tiny_model("llama", vocab_size=VOCAB_SIZE + 8)
    distill.save_draft(distill.init_standalone_draft(other, KEPT, [0], oov_rank=4), tmp_path / "other")
    with pytest.raises(ValueError, match="train a draft for this target"):
        distill.pretrained_draft(tmp_path / "other", target)
    other.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a draft `distill` trains"):
        distill.pretrained_draft(tmp_path / "plain", target)


def test_saved_standalone_draft_loads_as_a_full_vocabulary_causal_lm(target, tmp_path):
    draft = distill.init_standalone_draft(target, KEPT, [1], oov_rank=4).eval()
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
    for option in ("--target", "--draft-type", "--teacher-dir", "--positions", "--steps", "--lr", "--batch-tokens",
                   "--unroll", "--out", "--seed", "--resume", "--init-from", "--fit-logit-scale", "--scale-prompts"):
        assert option in help_text


@pytest.mark.parametrize("arguments, message", [
    (["--evaluate", "a", "--fit-logit-scale", "b"], "--evaluate and --fit-logit-scale each run alone"),
    (["--init-from", "a", "--resume"], "--init-from starts a run from a saved draft, --resume continues a checkpoint"),
    (["--steps", "0"], "--steps must be positive (got 0)"),
    (["--lr", "0"], "--lr must be positive (got 0.0)"),
    (["--batch-tokens", "-8"], "--batch-tokens must be positive (got -8)"),
])
def test_cli_distill_refusals(arguments, message):
    """Refused before the target loads, rather than one option dropped or a 0 replaced by the default."""
    with pytest.raises(SystemExit, match=re.escape(message)):
        cli_main(["distill", *arguments])


def test_sharegpt_split_is_disjoint_fixed_and_about_ten_percent_held_out():
    train, heldout = data.user_messages("train"), data.user_messages("heldout")
    assert not set(train) & set(heldout)
    assert 0.08 < len(heldout) / (len(train) + len(heldout)) < 0.12
    assert heldout[0] == data.user_messages("heldout")[0] and all(len(m) >= data.MIN_PROMPT_CHARS for m in heldout)
    held_out = set(heldout)
    for i, chat in zip(range(300), data.train_conversations()):  # conversations never start with a held-out prompt
        assert chat[0]["content"] not in held_out and [m["role"] for m in chat[:2]] == ["user", "assistant"]
    for i, chat in zip(range(100), data.conversations("heldout")):  # and the held-out side's always do
        assert chat[0]["content"] in held_out and [m["role"] for m in chat[:2]] == ["user", "assistant"]
    with pytest.raises(ValueError, match="unknown split"):
        next(data.conversations("test"))


@pytest.fixture(scope="module")
def heldout(target, tmp_path_factory):
    from draft_fixtures import prompts, tiny_tokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("heldout")
    return teacher.target_continuations(target, tiny_tokenizer(), prompts(12), out, batch_size=5,
                                               max_new_tokens=10, seed=0, greedy=False)


def test_target_continuations_record_the_exact_target_distribution_and_are_reused(target, heldout, tmp_path):
    from draft_fixtures import EOS_ID, prompts, tiny_tokenizer

    head = target.get_output_embeddings()
    for sample in heldout:
        generated = sample.token_ids[sample.prompt_len:]
        assert 1 <= len(generated) <= 10 and not (generated[:-1] == EOS_ID).any()
        with torch.no_grad():
            logits = target(sample.token_ids[None].long()).logits[0]
        positions = torch.arange(sample.prompt_len - 1, len(sample.token_ids) - 1)
        torch.testing.assert_close(head(sample.hidden), logits[positions], atol=1e-4, rtol=1e-4)
    first = teacher.target_continuations(target, tiny_tokenizer(), prompts(3), tmp_path, 2, 6, 0, greedy=False)
    again = teacher.target_continuations(None, tiny_tokenizer(), prompts(3), tmp_path, 2, 6, 0, greedy=False)
    assert [s.token_ids.tolist() for s in again] == [s.token_ids.tolist() for s in first]
    with pytest.raises(ValueError, match="other prompts or settings"):
        teacher.target_continuations(None, tiny_tokenizer(), prompts(3, seed=1), tmp_path, 2, 6, 0, greedy=False)


def test_a_draft_equal_to_its_target_is_always_accepted(target, heldout):
    draft = distill.init_standalone_draft(target, list(range(VOCAB_SIZE)), [0, 1, 2], oov_rank=4).eval()
    stats = draft_quality.acceptance(draft, target, heldout)
    assert stats["alpha"] == pytest.approx(1.0, abs=1e-5) and stats["top1_agreement"] == 1.0
    assert stats["positions"] == sum(s.generated_len for s in heldout)
    assert draft_quality.chain_block_efficiency(1.0, 4) == 5 and draft_quality.chain_block_efficiency(0.5, 1) == 1.5
    assert draft_quality.chain_block_efficiency([0.5, 0.25], 3) == 1 + 0.5 + 0.125 + 0.125 * 0.25
    cost = draft_quality.relative_cost(draft, target, token_counts=(1, 4), past_len=8)
    assert set(cost) == {"1", "4"} and all(c["ratio"] > 0 for c in cost.values())


def test_acceptance_of_another_draft_is_the_overlap_of_p_and_q(target, heldout):
    """alpha = mean over positions of sum_x min(p(x), q(x)), with p and q from the models' own forwards."""
    draft = distill.init_standalone_draft(target, list(range(VOCAB_SIZE)), [1], oov_rank=4).eval()
    overlaps, agreements = [], []
    with torch.no_grad():
        for sample in heldout:
            generated = torch.arange(sample.prompt_len - 1, len(sample.token_ids) - 1)
            p = target(sample.token_ids[None].long()).logits[0, generated].softmax(-1)
            q = draft(sample.token_ids[None].long()).logits[0, generated].float().softmax(-1)
            overlaps.append(torch.minimum(p, q).sum(-1))
            agreements.append((p.argmax(-1) == q.argmax(-1)).float())
    stats = draft_quality.acceptance(draft, target, heldout)
    alpha = torch.cat(overlaps).mean().item()
    assert 0.05 < alpha < 0.95 and stats["alpha"] == pytest.approx(alpha, abs=1e-4)
    assert stats["top1_agreement"] == pytest.approx(torch.cat(agreements).mean().item())


def test_a_feature_draft_equal_to_its_target_is_accepted_at_every_depth(tmp_path):
    from draft_fixtures import prompts, tiny_tokenizer

    target, draft = exact_feature_pair(vocab_size=VOCAB_SIZE)
    samples = teacher.target_continuations(target, tiny_tokenizer(), prompts(4), tmp_path, 4, 8, 0, greedy=True)
    stats = draft_quality.acceptance(draft, target, samples)
    assert len(stats["alpha_by_depth"]) == draft_quality.FEATURE_DEPTHS
    assert stats["alpha_by_depth"] == pytest.approx([1.0] * draft_quality.FEATURE_DEPTHS, abs=1e-4)
    assert stats["top1_agreement_by_depth"] == [1.0] * draft_quality.FEATURE_DEPTHS
    cost = draft_quality.relative_cost(draft, target, token_counts=(1,), past_len=8)
    json.dumps(cost)


def test_teacher_data_on_the_targets_own_continuations(target, teacher_data, tmp_path, monkeypatch):
    """The target continues train prompts and reads prompt + continuation back: the continuation is the assistant
    turn, its features are the target's; it mixes with the ShareGPT data (`+`) for training."""
    from draft_fixtures import prompts, tiny_tokenizer

    monkeypatch.setattr(data, "train_prompts", lambda n, tokenizer, max_tokens: prompts(n))
    torch.manual_seed(0)
    generated = teacher.build_generated_teacher_data(target, tiny_tokenizer(), tmp_path, prompts=6, max_new_tokens=8,
                                                     batch_size=4, log=lambda *args: None)
    assert len(generated) == 6
    head = target.get_output_embeddings()
    for i in range(len(generated)):
        sequence = generated[i]
        prompt_len = len(sequence.tokens) - int(sequence.assistant.sum())
        assert not sequence.assistant[:prompt_len].any() and 1 <= int(sequence.assistant.sum()) <= 8
        with torch.no_grad():
            logits = target(sequence.tokens[None].long()).logits[0]
            torch.testing.assert_close(head(sequence.features.float()), logits, atol=2e-2, rtol=1e-2)
    both = teacher_data + generated
    assert len(both) == len(teacher_data) + 6 and both.lengths()[-6:] == generated.lengths()
    assert torch.equal(both[len(teacher_data)].tokens, generated[0].tokens)


def test_a_draft_equal_to_its_target_fits_the_unit_logit_scale(target, heldout):
    """q = p at scale 1 and nowhere else, so the fit finds 1 (and alpha 1 there)."""
    draft = distill.init_standalone_draft(target, list(range(VOCAB_SIZE)), [0, 1, 2], oov_rank=4).eval()
    fit = draft_quality.fit_logit_scale(draft, target, heldout)
    assert fit["logit_scale"] == 1.0 and fit["alpha_by_scale"]["1"] == pytest.approx(1.0, abs=1e-5)
    assert max(fit["alpha_by_scale"].values()) == fit["alpha_by_scale"]["1"] and len(fit["alpha_by_scale"]) == 15


def test_overlap_is_largest_where_the_scaled_q_is_p():
    logits = torch.randn(5, 11)
    p = torch.softmax(1.3 * logits, dim=-1)
    overlap = draft_quality.overlap_by_scale(p, logits, torch.tensor([0.9, 1.0, 1.3, 1.5]))
    assert overlap[2] == pytest.approx(torch.ones(5)) and (overlap[[0, 1, 3]] < 1 - 1e-3).all()


@pytest.mark.parametrize("draft_type", ["standalone", "feature"])
def test_the_logit_scale_multiplies_the_kept_logits_and_is_saved(draft_type, target, tmp_path):
    if draft_type == "feature":
        draft = distill.init_feature_draft(target, KEPT, 1, oov_rank=4).eval()
        inputs = {"features": torch.randn(1, 7, target.config.hidden_size)}
    else:
        draft = distill.init_standalone_draft(target, KEPT, [1], oov_rank=4).eval()
        inputs = {}
    tokens = torch.randint(VOCAB_SIZE, (1, 7))
    with torch.no_grad():
        unscaled = draft(tokens, **inputs).logits
        draft.config.logit_scale = draft.lm_head.logit_scale = 1.25
        scaled = draft(tokens, **inputs).logits
    torch.testing.assert_close(scaled[..., KEPT], 1.25 * unscaled[..., KEPT])
    assert torch.isneginf(scaled[..., [k for k in range(VOCAB_SIZE) if k not in KEPT]]).all()
    distill.save_draft(draft, tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).lm_head.logit_scale == 1.25
