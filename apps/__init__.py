"""What runs on a saved folder for people: the Gradio web app (`apps.web`) and what it shows (`apps.inspect_model`)."""
