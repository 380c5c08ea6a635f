"""The web app's entry script inside the package (what `serve` runs): Streamlit's navigation over web/views/.

The checkout's app.py is the same two lines, for `streamlit run app.py`.
"""

from internlm_app.web.page import exit_unless_streamlit, navigate

exit_unless_streamlit("internlm_app/web/app.py")
navigate()
