"""An image followed by a multi-turn dialogue (the notebook's 1950s car): image and text in, text and up to
3 retrieved images out."""
import common

NOTEBOOK_PROMPTS = [
    "What is this image?",
    "Is the image in color?",
    "When do you think it was taken?",
    "Do you know what kind of car it is?",
    "Show me more photos of the car",
]
# The miniworld's pictures are of shapes, not of cars taken at some date.
MINIWORLD_PROMPTS = [
    "What is this image?",
    "Is the image in color?",
    "How many shapes are there?",
    "Do you know what shape it is?",
    "Show me more pictures of the shape",
]


def main() -> int:
    example = common.load(common.parse_args(__doc__, image=True), NOTEBOOK_PROMPTS, MINIWORLD_PROMPTS)
    common.dialogue(example, ret_scale_factor=1.15, max_num_rets=3)
    return 0


if __name__ == "__main__":
    common.run(main)
