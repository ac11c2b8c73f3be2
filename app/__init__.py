"""Web app: erase a concept in the browser and compare original vs unlearned generations side by side.

``python -m erasure_app`` (or ``erasure-app``) serves it on 127.0.0.1:7860. The UI (:mod:`erasure_app.main`, :mod:`erasure_app.tabs`)
only does I/O; all work goes through :class:`erasure_app.service.AppService`.
"""
