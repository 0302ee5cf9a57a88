"""``anycam evaluate``: deletion/insertion AUC, the pointing game and the sanity check of every
method on the demo model, per installed framework (needs ``anycam[metrics]``).
"""

from __future__ import annotations

import argparse

import numpy as np

from .._errors import require
from .demo import DemoRun, _choose_backends, _inputs, _layer_methods
from .explain import output_folder


def evaluate(args: argparse.Namespace) -> int:
    from ..metrics.faithfulness import deletion, insertion
    from ..metrics.localisation import pointing_game
    from ..metrics.sanity import sanity_check

    require("scipy", "metrics", "anycam evaluate")  # before minutes of work, not after
    backends = _choose_backends(args.backend)
    methods = _layer_methods() if args.method == "all" else [args.method]
    out = output_folder(args.out)
    print(f"anycam evaluate: backends {', '.join(backends)}; layer {args.layer!r}; {args.count} canvases")
    run = DemoRun(backends, args.layer)
    images = run.demo["images"][: args.count]
    labels, boxes = run.demo["labels"][: args.count], run.demo["boxes"][: args.count]
    print()
    print(
        "| backend | method | deletion AUC ↓ | insertion AUC ↑ | pointing game ↑ "
        "| sanity: Spearman at full randomisation ↓ |"
    )
    print("|---|---|---|---|---|---|")
    results: dict[tuple[str, str], tuple[float, ...]] = {}
    notes: list[str] = []
    plot_done = False
    for name in backends:
        _, layout = run.models[name]
        x = _inputs(images, layout)
        for method in methods:
            want_plot = not plot_done and method == "gradcam"
            explainer, explanation = run.explain(name, method, images)
            heat = explanation.heatmap
            kwargs = {"steps": args.steps, "input_layout": layout, "progress": False}
            deleted = deletion(explainer, x, heat, labels, **kwargs)
            inserted = insertion(explainer, x, heat, labels, **kwargs)
            hits = pointing_game(heat, boxes).mean() * 100
            sanity = sanity_check(explainer, x, target=labels, mode="cascading" if want_plot else "full")
            row = (
                float(deleted.auc.mean()),
                float(inserted.auc.mean()),
                float(hits),
                float(sanity.spearman[-1].mean()),
            )
            results[(name, method)] = row
            print(f"| {name} | {method} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.1f}% | {row[3]:.3f} |", flush=True)
            if want_plot:
                plot_done = True
                try:
                    sanity.plot(str(out / "sanity.png"))
                    notes.append(f"wrote {out / 'sanity.png'} (cascading randomisation, {name}, gradcam)")
                except ImportError as exc:
                    notes.append(f"no sanity picture: {exc}")
    spread = 0.0
    for method in methods:
        rows = [results[(b, method)][:3] for b in backends]
        spread = max(spread, float(np.max(np.ptp(np.array(rows), axis=0))))
    if len(backends) > 1:
        notes.append(
            f"deletion, insertion and pointing game agree across frameworks to {spread:.1e}; the sanity "
            "column re-draws weights with each framework's own initialiser, so it agrees only in distribution"
        )
    # Notes after the table, so the table stays one block that pastes as Markdown.
    print()
    for note in notes:
        print(note)
    return 0
