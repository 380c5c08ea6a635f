"""The Streamlit web app: its entry script (app.py), pages/ (chat, status, history) and their support code:
labels, session state, loading, streaming, versions, files, tools, login."""
