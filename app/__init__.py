"""attnpack.app: the Gradio web app. Until it lands, `make app` runs `attnpack info`."""
