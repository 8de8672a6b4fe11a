// The width at which a node shows its title and every widget's label and value uncut. LiteGraph (frontend
// 1.35) sizes a new node for its labels and a short value (42 px), and when a value is longer (a file name
// such as mole_face_sd15.safetensors) it keeps the value whole and cuts the label, down to "…"; it sizes a
// node with few widgets by an estimate of its title that errs short ("MoA Record R..."). Used by
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

// LGraphNode.drawTitleText: the title starts one title height in and is cut one title height short of the
// right edge, in the canvas's title font.
function titleWidth(node) {
  const title = node.getTitle?.() ?? node.title ?? "";
  const size = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  const font = globalThis.LiteGraph ? `${LiteGraph.NODE_TEXT_SIZE}px ${LiteGraph.NODE_FONT}` : "14px Arial";
  titleWidth.ctx ??= globalThis.document?.createElement("canvas").getContext("2d");
  if (!titleWidth.ctx) return title.length * 14 * 0.6 + 2 * size;
  titleWidth.ctx.font = font;
  return titleWidth.ctx.measureText(title).width + 2 * size + 4;
}

export function labelWidth(node) {
  let width = titleWidth(node);
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

// The nodes that show pictures in themselves after a run (nodes/visualize_nodes.py), and the room they get
// below their widgets: the preview widget's 220 px and the space for the image index bar.
export const PREVIEW_NODES = new Set(["MoLE_GateMaps", "MoA_RouterMaps"]);
export const PREVIEW_ROOM = 260;
export const PREVIEW_MIN_WIDTH = 320;

/** Makes a Maps node tall enough for its pictures (true if it grew); other nodes are left as they are. */
export function reservePreviewRoom(node) {
  if (!PREVIEW_NODES.has(node.constructor?.comfyClass ?? node.comfyClass ?? node.type)) return false;
  const height = (node.computeSize?.()[1] ?? node.size[1]) + PREVIEW_ROOM;
  if (node.size[1] >= height && node.size[0] >= PREVIEW_MIN_WIDTH) return false;
  node.setSize([Math.max(node.size[0], PREVIEW_MIN_WIDTH), Math.max(node.size[1], height)]);
  return true;
}
