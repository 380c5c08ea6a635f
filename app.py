"""InternLM2 Chat web app: `python -m internlm_app serve` (with the API on one port) or `streamlit run app.py`.

The entry script only routes: Streamlit's own navigation (st.navigation) over internlm_app/web/views/ (chat, status,
history; not a pages/ folder, see web/page.py), with titles in the session's language. Plain `python app.py` only
prints the commands that serve it.
"""

from internlm_app.web.page import exit_unless_streamlit, navigate

exit_unless_streamlit("app.py")
navigate()
