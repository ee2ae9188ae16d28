"""Planning one build: resolved stages -> the DAG of steps with their keys (``make_plan``).

A :class:`_Planner` walks the target stage and, depth first, every stage it needs (``FROM
<stage>``, ``COPY --from=<stage>``); each stage becomes a ``base`` node, one node per
instruction and an ``end`` node.  A step's key is blake3 over its canonical inputs
(:mod:`builder.plan.keys`): the instruction, the state it runs in, its sources and, except for
``--link`` steps, the key of the chain below it.  The data types and the source selection it
uses live in :mod:`builder.plan.dag`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from builder.frontend import dockerfile as df
from builder.plan.context import BuildContext
from builder.plan.copyspec import chown_is_named, merkle, parse_chmod
from builder.plan.dag import (
    Dag,
    ExternalImage,
    Hasher,
    ImageResolver,
    Plan,
    PlanOptions,
    StagePlan,
    Step,
    _check_platform,
    _instr_fields,
    _stage_by_ref,
    _with_onbuild_triggers,
    bind_sources,
    copy_is_multi,
    find_target,
    heredoc_sources,
    select_context,
    step_name,
)
from builder.plan.imageconfig import ImageState, apply_config, join_workdir
from builder.plan.keys import canonical, key_of, step_key, with_format
from cache.errors import InvalidInput, LbuildError, NotFound


def make_plan(
    dockerfile: df.Dockerfile,
    ctx: BuildContext,
    opts: PlanOptions,
    resolve_image: ImageResolver,
    hasher: Hasher,
    known: Mapping[str, Any] | None = None,
) -> Plan:
    """Build the step DAG for ``opts.target`` and compute every step's key.

    ``known``: a DAG stored by an earlier build (``Dag.to_json()`` plus ``"order"``); its
    order is reused when its nodes and edges are exactly this plan's.
    """
    p = _Planner(dockerfile, ctx, opts, resolve_image, hasher)
    target = find_target(dockerfile, opts.target)
    p.plan_stage(target)
    graph = p.graph
    order = None
    if (
        known is not None
        and known.get("nodes") == graph.nodes
        and known.get("edges") == [list(e) for e in graph.edges]
        and isinstance(known.get("order"), list)
        and sorted(known["order"]) == sorted(graph.nodes)
    ):
        order = list(known["order"])
    return Plan(graph, p.steps, p.stages, target, dockerfile, dockerfile.filename, order)


@dataclass
class _Planner:
    """The state of one planning: the DAG so far, its steps and the stages planned."""

    dockerfile: df.Dockerfile
    ctx: BuildContext
    opts: PlanOptions
    resolve_image: ImageResolver
    hasher: Hasher
    graph: Dag = field(default_factory=Dag)
    steps: dict[str, Step] = field(default_factory=dict)
    stages: dict[int, StagePlan] = field(default_factory=dict)
    visiting: list[int] = field(default_factory=list)

    @property
    def file(self) -> str:
        return self.dockerfile.filename

    def plan_stage(self, idx: int) -> StagePlan:
        """Stage ``idx`` planned (once), the stages it needs first; a cycle is exit 2."""
        if idx in self.stages:
            return self.stages[idx]
        if idx in self.visiting:
            names = [self.dockerfile.stages[i].name or str(i) for i in [*self.visiting, idx]]
            raise InvalidInput(
                f"circular dependency detected on stage: {' -> '.join(names)}",
                file=self.file,
                line=self.dockerfile.stages[idx].base.line,
            )
        self.visiting.append(idx)
        try:
            sp = self._stage(idx)
        finally:
            self.visiting.pop()
        self.stages[idx] = sp
        return sp

    def external(self, ref: str, line: int, what: str) -> ExternalImage:
        """An image FROM or ``COPY --from`` names that is not a stage."""
        try:
            img = self.resolve_image(ref)
        except LbuildError as e:  # a build context's or a registry's answer: say where
            if e.file is None:
                e.file, e.line, e.message = self.file, line, f"{what} {ref!r}: {e.message}"
            raise
        if img is None:
            raise NotFound(
                f"{what} {ref!r}: no such stage, build context or local image "
                "(registry pulls are not supported yet)",
                file=self.file,
                line=line,
            )
        return img

    def _stage(self, idx: int) -> StagePlan:
        stage = self.dockerfile.stages[idx]
        sp, base, state = self._base(idx, stage)
        stage = _with_onbuild_triggers(stage, state, self.file)
        resolved = df.resolve_stage(self.dockerfile, stage, state.env, self.opts.build_args)
        chain_prev: list[str] = [base.id]  # nodes the next non-link step must wait for
        parent_key = base.key
        for pos, r in enumerate(resolved):
            st, deps = self._step(idx, stage, pos, len(stage.instructions), r, state, parent_key)
            self.graph.add_node(st.id)
            if st.link and st.inputs.get("parent") is None:
                for d in deps:
                    self.graph.add_edge(d, st.id)
                chain_prev.append(st.id)
            else:
                for d in [*chain_prev, *deps]:
                    self.graph.add_edge(d, st.id)
                chain_prev = [st.id]
            # a --link key leaves out the chain below it; the chain key after it must not
            parent_key = (
                step_key({"op": "STACK", "below": parent_key, "link": st.key})
                if st.inputs.get("parent", "") is None
                else st.key
            )
            self.steps[st.id] = st
            sp.steps.append(st)
        end = Step(
            f"{idx}:end",
            idx,
            len(resolved),
            "end",
            f"[{stage.name or f'stage-{idx}'}] end",
            key=parent_key,
            state=state,
        )
        self.graph.add_node(end.id)
        for d in chain_prev:
            self.graph.add_edge(d, end.id)
        self.steps[end.id] = end
        sp.steps.append(end)
        return sp

    def _base(self, idx: int, stage: df.Stage) -> tuple[StagePlan, Step, ImageState]:
        """The stage's plan, its ``base`` node (FROM) and the image state FROM gives."""
        opts = self.opts
        base_ref = df.resolve_base(self.dockerfile, stage, opts.build_args)
        _check_platform(df.resolve_platform(self.dockerfile, stage, opts.build_args), self.file, stage)
        sp = StagePlan(idx, stage.name, [])
        base = Step(
            f"{idx}:base",
            idx,
            -1,
            "base",
            f"[{stage.name or f'stage-{idx}'}] FROM {base_ref}",
            instr=stage.base,
            line=stage.base.line,
        )
        if base_ref.lower() == "scratch":
            state = ImageState.scratch()
            base.key = step_key({"op": "FROM", "image": "scratch", "platform": opts.platform})
        else:
            ref_stage = _stage_by_ref(self.dockerfile, base_ref, before=idx)
            if ref_stage is not None:
                end = self.plan_stage(ref_stage).steps[-1]
                assert end.state is not None
                state = end.state.clone()
                state.cmd_set = False
                sp.base_stage = ref_stage
                self.graph.add_edge(end.id, base.id)
                base.key = step_key({"op": "FROM", "stage": end.key})
            else:
                img = self.external(base_ref, stage.base.line, "FROM")
                sp.base_image = img
                state = ImageState.from_config(img.config)
                base.key = step_key({"op": "FROM", "image": img.manifest_digest})
        base.state = state.clone()
        base.inputs = {"op": "FROM", "base": base_ref}
        self.graph.add_node(base.id)
        self.steps[base.id] = base
        sp.steps.append(base)
        return sp, base, state

    def _step(
        self,
        idx: int,
        stage: df.Stage,
        pos: int,
        total: int,
        r: df.Resolved,
        state: ImageState,
        parent_key: str,
    ) -> tuple[Step, list[str]]:
        """One instruction's step with its key, and the nodes it depends on besides its
        chain.  ``state`` is the image state before it; config instructions change it."""
        instr = r.instruction
        st = Step(
            f"{idx}:{pos}",
            idx,
            pos,
            "config",
            step_name(stage, pos, total, instr),
            instr=instr,
            env=r.env,
            args=r.args,
            run_env=r.run_env,
            line=instr.line,
        )
        st.state = state.clone()
        inputs: dict[str, Any] = {
            "op": type(instr).__name__.upper(),
            "instruction": _instr_fields(instr),
        }
        deps: list[str] = []
        if isinstance(instr, df.Copy):
            deps = self._copy(st, instr, idx, state, parent_key, inputs)
        elif isinstance(instr, df.Run):
            st.kind = "run"
            inputs["state"] = {
                "env": state.env,
                "workdir": state.workdir,
                "user": state.user,
                "shell": list(state.shell),
                "args": [list(a) for a in r.args],
                "run_env": [list(a) for a in r.run_env],
                "platform": self.opts.platform,
            }
            binds = bind_sources(self.ctx, instr, self.hasher, self.file)
            if binds:
                inputs["binds"] = binds
            if self.opts.clamp is not None:
                inputs["clamp"] = self.opts.clamp
            inputs["parent"] = parent_key
        elif isinstance(instr, df.Workdir):
            st.kind = "workdir"
            new_wd = join_workdir(state.workdir, instr.path)
            state.config["WorkingDir"] = new_wd
            inputs["workdir"] = new_wd
            inputs["user"] = state.user  # owns the directories it creates
            inputs["parent"] = parent_key
        else:
            if not apply_config(state, instr, self.file):
                raise InvalidInput(
                    f"unsupported instruction: {type(instr).__name__.upper()}",
                    file=self.file,
                    line=instr.line,
                )
            inputs["parent"] = parent_key
        st.inputs = with_format(inputs)
        st.inputs_json = canonical(st.inputs)
        st.key = key_of(st.inputs_json)
        return st, deps

    def _copy(
        self,
        st: Step,
        instr: df.Copy,
        idx: int,
        state: ImageState,
        parent_key: str,
        inputs: dict[str, Any],
    ) -> list[str]:
        """COPY/ADD's inputs (sources from the context, a stage or an image); its deps."""
        st.kind = "copy"
        st.link = instr.link
        parse_chmod(instr.chmod, self.file, instr.line)
        deps: list[str] = []
        if instr.from_:
            ref_stage = _stage_by_ref(self.dockerfile, instr.from_, before=None)
            if ref_stage == idx:
                raise InvalidInput(
                    f"circular dependency detected on stage: {instr.from_}",
                    file=self.file,
                    line=instr.line,
                )
            if ref_stage is not None:
                src = self.plan_stage(ref_stage)
                st.from_stage = ref_stage
                deps.append(src.steps[-1].id)
                inputs["from"] = {"stage": src.steps[-1].key}
            else:
                img = self.external(instr.from_, instr.line, "COPY --from")
                st.from_image = img
                inputs["from"] = {"image": img.manifest_digest}
        else:
            st.selected = [
                *select_context(self.ctx, instr, self.hasher, self.opts.keep_mtime, self.file),
                *heredoc_sources(instr),
            ]
            inputs["sources"] = merkle(st.selected)
        inputs["multi"] = copy_is_multi(instr)
        inputs["epoch"] = self.opts.epoch
        if not instr.dest.startswith("/"):
            inputs["workdir"] = state.workdir
        if instr.link and not chown_is_named(instr.chown):
            inputs["parent"] = None
        else:
            inputs["parent"] = parent_key
        return deps
