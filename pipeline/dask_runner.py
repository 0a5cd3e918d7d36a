"""`CorrectedDaskRunner`: Beam 2.77's experimental DaskRunner with the defects that stop it running the
flowcurate graph fixed (docs/deploy.md, "Dask"): the stock runner computes only the last transform it
visits, hands every output of a multi-output ParDo to each consumer of any one of them, and drops what
a DoFn emits in `finish_bundle` (where Beam's file sinks report what they wrote). This runner keeps
output tags and `finish_bundle` outputs, computes every sink, computes side inputs once, and spreads
GroupByKey over `--dask_npartitions` partitions.

    flowcurate run ... --runner flowcurate.pipeline.dask_runner.CorrectedDaskRunner --dask_client_address tcp://HOST:8786

Experimental, like the runner it corrects; tested against the in-process run in
tests/test_pipeline_dask.py (equal manifests and shards on 2 Dask worker processes).
"""

from __future__ import annotations

import dask
from apache_beam import DoFn, ParDo, pvalue
from apache_beam.internal import pickler
from apache_beam.pipeline import PipelineVisitor
from apache_beam.runners.common import (
    DoFnContext,
    DoFnInvoker,
    DoFnSignature,
    Receiver,
    _OutputHandler,
)
from apache_beam.runners.dask.dask_runner import DaskOptions, DaskRunner, DaskRunnerResult
from apache_beam.runners.dask.overrides import _GroupByKeyOnly, dask_overrides
from apache_beam.runners.dask.transform_evaluator import (
    TRANSLATIONS,
    Flatten,
    NoOp,
    defenestrate,
    get_windowed_value,
)
from apache_beam.transforms.sideinputs import SideInputMap

# ---- the corrected runner -----------------------------------------------------------------------------

_MAIN = "__main__"  # the tag of a ParDo's main output inside a bundle's result


class _Collect(Receiver):
    def __init__(self, tag, out):
        self.tag, self.out = tag, out

    def receive(self, windowed_value):
        self.out.append((self.tag, windowed_value.value))


class _Receivers(dict):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def __missing__(self, tag):
        self[tag] = receiver = _Collect(tag, self.out)
        return receiver


def _bundle(items, blob, label, views, *side_values):
    """One Dask partition as one bundle: a DoFn unpickled for it, every output kept with its tag,
    `finish_bundle`'s included (the stock runner reads the outputs before calling it)."""
    fn, args, kwargs, window_fn = pickler.loads(blob)
    out: list = []
    receivers = _Receivers(out)
    side_inputs = [SideInputMap(view, options, [get_windowed_value(v, None) for v in values])
                   for (view, options), values in zip(views, side_values)]
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(fn),
        _OutputHandler(window_fn=window_fn, main_receivers=receivers[_MAIN], tagged_receivers=receivers,
                       per_element_output_counter=None, output_batch_converter=None,
                       process_yields_batches=False, process_batch_yields_elements=False),
        context=DoFnContext(label, state=None), side_inputs=side_inputs, input_args=list(args),
        input_kwargs=kwargs, user_state_context=None, bundle_finalizer_param=DoFn.BundleFinalizerParam())
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(get_windowed_value(item, window_fn))
    invoker.invoke_finish_bundle()
    invoker.invoke_teardown()
    return out


def _concat(parts):
    return [x for part in parts for x in part]


def _key(kv):
    return kv[0]


def _grouped(kv):
    return kv[0], [defenestrate(v[1]) for v in kv[1]]


class _BagsVisitor(PipelineVisitor):
    """PCollection -> dask Bag (the stock visitor maps transforms to bags, so tags get lost)."""

    def __init__(self, bag_kwargs: dict):
        self.bag_kwargs = bag_kwargs
        self.bags: dict = {}
        self.consumed: set = set()

    def visit_transform(self, node):
        inputs = []
        for pc in node.inputs:
            if isinstance(pc, pvalue.PBegin):
                inputs.append(None)
            else:
                inputs.append(self.bags[pc])
                self.consumed.add(pc)
        kind = node.transform.__class__
        if kind is ParDo:
            self.bags.update(self._pardo(node, inputs[0]))
            return
        if kind is _GroupByKeyOnly:
            n = max(inputs[0].npartitions, self.bag_kwargs.get("npartitions") or 1)
            bag = inputs[0].groupby(_key, npartitions=n).map(_grouped)
        else:
            op = TRANSLATIONS.get(kind, NoOp)(node, bag_kwargs=self.bag_kwargs)
            bag = op.apply(input_bag=inputs if isinstance(op, Flatten) or len(inputs) != 1 else inputs[0])
        for pc in node.outputs.values():
            self.bags[pc] = bag

    def _pardo(self, node, bag) -> dict:
        t = node.transform
        args, kwargs = t.raw_side_inputs
        main_input = next(iter(node.main_inputs.values()))
        window_fn = main_input.windowing.windowfn if hasattr(main_input, "windowing") else None
        views, side_values = [], []
        for si in node.side_inputs:  # computed once, as a dependency (the stock runner recomputes per bundle)
            self.consumed.add(si.pvalue)
            views.append((type(si), si._view_options()))
            # unoptimised: a bag optimised on its own gets renamed tasks, so its upstream would run again
            side_values.append(dask.delayed(_concat)(self.bags[si.pvalue].to_delayed(optimize_graph=False)))
        blob = pickler.dumps((t.fn, args, kwargs, window_fn))
        tagged = bag.map_partitions(_bundle, blob, t.label, views, *side_values)
        return {pc: tagged.filter(lambda tv, want=_MAIN if tag in (None, "None") else tag: tv[0] == want)
                .map(lambda tv: tv[1])
                for tag, pc in node.outputs.items()}


class _Result(DaskRunnerResult):
    def wait_until_finish(self, duration=None):
        try:
            return super().wait_until_finish(duration)
        finally:
            self.client.close()


class CorrectedDaskRunner(DaskRunner):
    """Beam's DaskRunner computing every sink, keeping ParDo output tags and `finish_bundle` outputs."""

    def run_pipeline(self, pipeline, options):
        import dask.distributed as ddist

        dask_options = options.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True)
        bag_kwargs = DaskOptions._extract_bag_kwargs(dask_options)
        client = ddist.Client(**dask_options)
        pipeline.replace_all(dask_overrides())
        visitor = _BagsVisitor(bag_kwargs)
        pipeline.visit(visitor)
        leaves = [bag for pc, bag in visitor.bags.items() if pc not in visitor.consumed]
        # unfused: each bundle its own task, so consecutive stages may run in different worker processes
        return _Result(client, client.compute(leaves, optimize_graph=False))
