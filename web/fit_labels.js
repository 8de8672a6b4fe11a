// This pack's nodes are made wide enough for their titles, widgets' labels and values when added (as core's
// 3D nodes set their own default size) and widen when a longer value is picked, so that no title or label is
// cut ("MoA Record R...", "ex… mole_face_sd15.safetensors"). The Maps nodes are added with room below their
// widgets for the pictures they show after a run: the frontend draws an image preview in the space a node
// has (its preview widget asks for 220 px), so a node sized for its widgets alone has its pictures drawn
// over the nodes below it. A node never narrows; a loaded workflow keeps its saved sizes.
import { app } from "../../scripts/app.js";
import { fitLabels, reservePreviewRoom } from "./labels.js";

const PACK_NODE = /^(MoLE|MoA)_/;

app.registerExtension({
  name: "MoLE-MoA.FitWidgetLabels",
  nodeCreated(node) {
    if (!PACK_NODE.test(node.constructor?.comfyClass ?? node.comfyClass ?? "")) return;
    fitLabels(node);
    reservePreviewRoom(node);
    const changed = node.onWidgetChanged;
    node.onWidgetChanged = function (...args) {
      const result = changed?.apply(this, args);
      fitLabels(this);
      return result;
    };
  },
});
