"""The Gradio demo: app.py (the page and its launch), handlers.py (what its buttons and API do), figures.py."""
