"""Support code for the Streamlit web app (app.py and pages/): labels, session state, loading, streaming, login."""
