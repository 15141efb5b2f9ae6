"""The Gradio demo app: ``app.py`` (``vlatent demo``)."""
