"""The app's routes, one router per concern: health and the model's card, answers (scores,
explanations, the gallery), feedback, and the page."""
