"""The look shared by afina's HTML pages (eval report, long-context page)."""

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}.best{font-weight:bold;background:#e6f4ea}
.flag{color:#b00020;font-weight:bold}img{max-width:100%}pre{white-space:pre-wrap;margin:0}
td.text{text-align:left;max-width:420px;font-size:90%}
"""

# Marks the page once every plot has decoded, so a headless browser can check they render.
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img.plot'));
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-plots-total', String(imgs.length));
  document.body.setAttribute('data-plots-rendered', String(ok));
});
"""
