"""What both ranked-list pages share (``page``: the labelled report, ``plain``: ranked lists
without labels): the row labels, the inline CSS and JS, and image path resolution."""
from __future__ import annotations

import os

ROW_LABELS = {"baseline": "baseline", "kr": "+KR", "nformer": "+NFormer",
              "nformer_kr": "+NFormer+KR"}

STYLE = """body{font-family:sans-serif;margin:16px;background:#fafafa}
.bar button{margin-right:6px;padding:4px 10px}.bar button.on{background:#333;color:#fff}
.q{background:#fff;border:1px solid #ddd;margin:10px 0;padding:8px}.q.hidden{display:none}
.row{display:flex;align-items:center;margin:3px 0}.lab{width:170px;font-size:12px}
.row img{height:96px;width:48px;object-fit:cover;margin-right:3px;border:3px solid #999}
img.ok{border-color:#1a1}img.bad{border-color:#d22}img.qimg{border-color:#333}
.head{font-size:13px;margin-bottom:4px}.body{display:flex;align-items:center}
.body>img.qimg{height:140px;width:70px;margin-right:14px;border:3px solid #333}.fixed{color:#1a1}.broke{color:#d22}"""

SCRIPT = """function show(f){var n=0;document.querySelectorAll('.q').forEach(function(q){
var on=f==='all'||q.dataset.category===f;q.classList.toggle('hidden',!on);if(on)n++;});
document.body.dataset.filter=f;document.body.dataset.visible=n;
document.querySelectorAll('.bar button').forEach(function(b){
b.classList.toggle('on',b.dataset.filter===f);});}
function fromHash(){var m=/filter=(\\w+)/.exec(location.hash);show(m?m[1]:'all');}
document.querySelectorAll('.bar button').forEach(function(b){b.onclick=function(){
location.hash='filter='+b.dataset.filter;};});
window.addEventListener('hashchange',fromHash);fromHash();
window.addEventListener('load',function(){var ok=0,bad=0;
document.querySelectorAll('img').forEach(function(i){if(i.complete&&i.naturalWidth>0)ok++;
else bad++;});document.body.dataset.imagesLoaded=ok;document.body.dataset.imagesFailed=bad;});"""


def resolve_image_path(path: str, root: str) -> str:
    """``path`` as given when absolute (or no ``root``), else under ``root``."""
    return path if os.path.isabs(path) or not root else os.path.join(root, path)
