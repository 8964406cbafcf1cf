"""What the draft's low-rank embedding of out-of-vocabulary input tokens costs in acceptance.

Evaluates the shipped standalone draft three ways on the held-out continuations written by
`hf-specdec distill --evaluate ... --out OUT` (OUT/heldout/sampled): as shipped (rank-r embedding for input
tokens outside its 8192-token vocabulary), with the target's exact embedding rows for those tokens, and
with one shared (zero) embedding for all of them. No retraining: the gaps bound what a full embedding
would buy and what the low-rank table buys over a single shared vector.

    python examples/draft_oov_ablation.py OUT/heldout/sampled
"""

import copy
import json
import sys
from pathlib import Path

import torch

from hf_specdec import models
from hf_specdec.draft_model import ReducedVocabEmbedding
from hf_specdec.draft_quality import acceptance
from hf_specdec.teacher import Continuation


def with_oov_table(draft, table: torch.Tensor):
    """A copy of `draft` whose out-of-vocabulary input tokens are embedded by the rows of `table`."""
    config = copy.deepcopy(draft.config)
    config.oov_embedding_rank = table.shape[1]
    variant = copy.deepcopy(draft)
    embedding = ReducedVocabEmbedding(config)
    embedding.load_state_dict(
        {
            "kept.weight": draft.model.embed_tokens.kept.weight,
            "oov.weight": table,
            "oov_up.weight": torch.eye(config.hidden_size, table.shape[1]),
            "kept_row": draft.model.embed_tokens.kept_row,
        }
    )
    variant.model.embed_tokens = embedding
    return variant


def main(data_dir: str) -> None:
    torch.set_num_threads(2)
    target, draft, _ = models.load_default_pair(draft_kind="standalone")  # the draft with the low-rank table
    samples = [Continuation(**fields) for path in sorted(Path(data_dir).glob("batch-*.pt"))
               for fields in torch.load(path)["samples"]]
    exact = target.get_input_embeddings().weight.detach()
    variants = {
        "shipped (low-rank)": draft,
        "exact target rows": with_oov_table(draft, exact),
        "one shared zero vector": with_oov_table(draft, torch.zeros(exact.shape[0], 1)),
    }
    print(json.dumps({name: acceptance(model, target, samples) for name, model in variants.items()}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
