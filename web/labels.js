// The width at which a node shows every widget's label and value uncut. LiteGraph (frontend 1.35) sizes
// a new node for its labels and a short value (42 px), and when a value is longer (a file name such as
// mole_face_sd15.safetensors) it keeps the value whole and cuts the label, down to "…". Used by
// fit_labels.js (this pack's nodes) and by workflows/build.py (every node of the shipped graphs).

// One widget row (BaseWidget.drawTruncatingText): 15 px margins outside and inside the row's box, the
// text 5 px in from the left and 20 px short of the right arrow, label and value 5 px apart. Text
// widgets have no arrows: for them the sum errs 25 px wide.
const WIDGET_CHROME = 4 * 15 + 5 + 20 + 5;
// A very long file name is cut rather than making a node wider than this.
export const MAX_WIDTH = 640;

function measure(text) {
  // The widgets' own font (LGraphCanvas.inner_text_font); before the canvas exists, computeSize's estimate.
  return globalThis.LGraphCanvas?._measureText?.(text) ?? text.length * 12 * 0.6;
}

export function labelWidth(node) {
  let width = 0;
  for (const w of node.widgets ?? []) {
    // DOM widgets (text areas, previews) lay themselves out; hidden ones are not drawn.
    if (w.element || w.options?.multiline || !(node.isWidgetVisible?.(w) ?? !w.hidden)) continue;
    const label = w.label || w.name || "";
    const value = w._displayValue ?? String(w.value ?? "");
    width = Math.max(width, measure(label) + measure(value) + WIDGET_CHROME);
  }
  return Math.min(Math.ceil(width), MAX_WIDTH);
}

/** Widens `node` (never narrows it) so that its widget labels are not cut; true if it grew. */
export function fitLabels(node) {
  const width = labelWidth(node);
  if (width <= node.size[0]) return false;
  node.setSize([width, node.size[1]]);
  return true;
}
