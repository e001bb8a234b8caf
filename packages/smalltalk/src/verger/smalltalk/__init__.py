"""verger-smalltalk: SmallTalk LM, an asynchronous mixture of language models.

E expert LMs trained fully independently, each on the shard of the corpus that its small
router LM claims; at inference a prefix of the input picks one expert (Filippova et al.,
"No Need to Talk: Asynchronous Mixture of Language Models", ICLR 2025, arXiv 2410.03529).

- :func:`balanced_assign` / :func:`solve_balanced`: sequences to experts under capacities
  (exact, fast with a certified gap, or the paper's greedy rule).
- :func:`train_routers`: the EM loop; :func:`shard_corpus`; :func:`train_expert` (one
  independent job); :class:`SmallTalkLM` (``from_pretrained``, ``route``, ``score``,
  ``generate``); :func:`evaluate`; :func:`account` (FLOPs).
"""

from verger.core import package_version
from verger.smalltalk.assign import Assignment, balanced_assign, balanced_capacities, solve_balanced
from verger.smalltalk.bench import BenchSettings
from verger.smalltalk.config import (
    EvalSettings,
    GenerateSettings,
    ShardSettings,
    SmallTalkConfig,
    TrainExpertSettings,
)
from verger.smalltalk.data import SequenceSet, load_data, prepare_data
from verger.smalltalk.demo import DemoSettings
from verger.smalltalk.evaluation import EvalResult, evaluate
from verger.smalltalk.exchange import LocalExchange, ProcessGroupExchange, ScoreExchange
from verger.smalltalk.experts import ExpertResult, expert_folder, train_expert
from verger.smalltalk.flops import FlopAccount, account
from verger.smalltalk.metrics import routing_purity
from verger.smalltalk.model import RoutedScores, SmallTalkLM
from verger.smalltalk.pipeline import build_mixture
from verger.smalltalk.routers import RouterResult, load_routers, train_routers
from verger.smalltalk.scoring import prefix_scores, score_matrix
from verger.smalltalk.sharding import ShardIndex, load_shard_index, shard_corpus

__version__ = package_version("verger-smalltalk")

__all__ = [
    "Assignment",
    "BenchSettings",
    "DemoSettings",
    "EvalResult",
    "EvalSettings",
    "ExpertResult",
    "FlopAccount",
    "GenerateSettings",
    "LocalExchange",
    "ProcessGroupExchange",
    "RoutedScores",
    "RouterResult",
    "ScoreExchange",
    "SequenceSet",
    "ShardIndex",
    "ShardSettings",
    "SmallTalkConfig",
    "SmallTalkLM",
    "TrainExpertSettings",
    "__version__",
    "account",
    "balanced_assign",
    "balanced_capacities",
    "build_mixture",
    "evaluate",
    "expert_folder",
    "load_data",
    "load_routers",
    "load_shard_index",
    "prefix_scores",
    "prepare_data",
    "routing_purity",
    "score_matrix",
    "shard_corpus",
    "solve_balanced",
    "train_expert",
    "train_routers",
]
