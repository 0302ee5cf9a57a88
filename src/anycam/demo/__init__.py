"""The demo: a small CNN trained on handwritten digits, its shipped weights and the synthetic canvases.

``data``: the canvases, boxes and ``load_demo()`` (``demo.npz``); ``weights``: the weight
layout every framework's demo network reads. The networks themselves live with their frameworks
(``anycam.backends.<framework>.demo``).
"""
