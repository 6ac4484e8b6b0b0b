"""Benchmark class lists, text-query name lists, zero-shot splits and colour palettes.

Everything here is plain data: tuples of names in **label-id order**, i.e. the order of the ids in the ground-truth
maps a benchmark is evaluated on.

Where each list comes from:

* ``CLASSES`` (canonical display names):

  - VOC21/VOC20, PC60/PC59, COCO-Stuff-171, Cityscapes-19 and ADE-150: the ``METAINFO`` class tuples of
    mmsegmentation 1.x (``mmseg/datasets/{voc,pascal_context,coco_stuff,cityscapes,ade}.py``, Apache-2.0). VOC20
    and PC59 are VOC21 and PC60 without ``background`` (``reduce_zero_label``); PC60/PC59 use the alphabetical
    order of mmseg's PASCAL-Context converter. mmseg writes ADE's ``"bed "`` with a trailing space; here it is
    ``"bed"`` (in every style; the space does not change the CLIP tokens).
  - COCO-Object: ``background`` followed by the 80 COCO things in standard order (the first 80 COCO-Stuff classes),
    as in the SCLIP-family ``COCOObjectDataset``.
  - PC-459: the PASCAL-Context ``labels.txt`` order (alphabetical, with ``unknown`` among them), as registered by
    the detectron2-based open-vocabulary repos (CAT-Seg, CLIPtrase, ProxyCLIP).
  - ADE-847: the ADE20K-Full ``trainId`` order of Mask2Former's ``register_ade20k_full.py``; each name keeps its
    WordNet synonyms (``"building, edifice"``), as in CAT-Seg, ZegFormer and CLIPtrase.
  - COCO-Stuff-27: the 27 COCO-Stuff supercategories (Caesar et al. hierarchy, IFSeg appendix Table 15) in the
    order used by PiCIE/STEGO for unsupervised COCO-Stuff-27 (12 thing groups, then 15 stuff groups).
    ``FINE_TO_COARSE`` maps each of the 171 classes to one of them.

* ``QUERY_NAMES[(dataset, style)]``: the text queries of each class (several names are synonyms; a class scores the
  maximum over its names). The styles reproduce the name files of the method repositories:

  - ``"sclip"``: SCLIP's ``configs/cls_*.txt`` (NACLIP uses the same files; they also serve MaskCLIP and vanilla
    CLIP). VOC: ``ship`` and ``table`` for boat and dining table, clothing synonyms for person, five television
    names for tvmonitor, and 26 stuff names as the background class of VOC21 and COCO-Object (which adds ``body``
    to person). PC60 uses the literal ``background``. COCO-Stuff, Cityscapes and ADE-150 use the mmseg names with
    the spaces removed (``trafficlight``, ``chestofdrawers``), as written in those files.
  - ``"clearclip"``: single names, the literal ``background`` for VOC21/PC60/COCO-Object. VOC21 is ClearCLIP's
    published ``cls_voc21.txt``; the other ClearCLIP files were not available to check, so VOC20 is VOC21 without
    background (as in ProxyCLIP, by the same authors), PC60/PC59/COCO-Object use the literal ``background`` and
    single names, and COCO-Stuff/Cityscapes/ADE-150 reuse the SCLIP lists (already single names).
  - ``"itaclip"``: ITACLIP's ``configs/cls_*.txt`` (only VOC21, PC60, COCO-Object, COCO-Stuff and Cityscapes are
    published): a 44-name background for VOC21, ``person in hat``, and ``avian``/``feline``/``seat``/
    ``motorcycle`` synonyms.
  - ``"cliptrase"``: CLIPtrase's ``configs/dataset_cfg.py``, which has single names and appends a background list
    after the classes of VOC21, PC60 and COCO-Object; here that list is class 0's names, kept as published,
    including the duplicated ``bed`` and ``beachhill`` (two strings fused by a missing comma). VOC20/VOC21 name the
    television class ``tv`` and PC59/PC60 name the table ``diningtable``; ADE-847 names are whole synonym strings
    used as one query each. No Cityscapes or COCO-Stuff-27 list is published.
  - ``"proxyclip"``: ProxyCLIP's ``configs/cls_*.txt`` (synonyms separated by ``"; "`` there): the 26 SCLIP stuff
    names as VOC21's background, single names (``ship``, ``table``, ``tvmonitor``), and a 17-name background for
    COCO-Object. Only its VOC21, VOC20 and COCO-Object files were available; the other datasets use the SCLIP lists.
  - ``"corrclip"``: CorrCLIP's files: ProxyCLIP's lists with ``people`` for ``person`` (seen in its VOC21, PC59 and
    Cityscapes files; applied to VOC20 and PC60 as well). COCO-Object, COCO-Stuff and ADE-150 use ProxyCLIP's.

* ``ZERO_SHOT_SPLITS``: the unseen classes of the ZegFormer splits used by ZegFormer, ZSSeg, FreeSeg, MAFT and
  IFSeg: COCO-Stuff 156/15, VOC20 15/5 (the last five VOC classes) and ADE-847 572/275 (unseen = the classes
  marked ``"rare"``, i.e. in at most 10 training images, in ZegFormer's ``register_ade20k_full_zero_freq.py``).
  The seen classes are all the others.

* ``palette``: the VOC bit-shift palette (VOC21; VOC20 drops its black), mmseg's ADE-150 palette (PC60/PC59 use its
  first 60 colours, as mmseg does) and the official Cityscapes train-id colours; any other dataset, and any colour
  past the end of an official palette, comes from the bit-shift palette.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _split(block: str, sep: str = ",") -> tuple[str, ...]:
    """The names of a text block, separated by ``sep`` (a line break may follow a separator)."""
    return tuple(name.strip() for name in block.split(sep) if name.strip())


# ----------------------------------------------------------------------------------------------------------------
# Canonical class lists.

BACKGROUND = "background"

_VOC20 = _split(
    """
    aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, diningtable, dog, horse, motorbike, person,
    pottedplant, sheep, sofa, train, tvmonitor
    """
)

_PC59 = _split(
    """
    aeroplane, bag, bed, bedclothes, bench, bicycle, bird, boat, book, bottle, building, bus, cabinet, car, cat,
    ceiling, chair, cloth, computer, cow, cup, curtain, dog, door, fence, floor, flower, food, grass, ground, horse,
    keyboard, light, motorbike, mountain, mouse, person, plate, platform, pottedplant, road, rock, sheep, shelves,
    sidewalk, sign, sky, snow, sofa, table, track, train, tree, truck, tvmonitor, wall, water, window, wood
    """
)

_PC459 = _split(
    """
    accordion, aeroplane, air conditioner, antenna, artillery, ashtray, atrium, baby carriage, bag, ball, balloon,
    bamboo weaving, barrel, baseball bat, basket, basketball backboard, bathtub, bed, bedclothes, beer, bell, bench,
    bicycle, binoculars, bird, bird cage, bird feeder, bird nest, blackboard, board, boat, bone, book, bottle,
    bottle opener, bowl, box, bracelet, brick, bridge, broom, brush, bucket, building, bus, cabinet, cabinet door,
    cage, cake, calculator, calendar, camel, camera, camera lens, can, candle, candle holder, cap, car, card, cart,
    case, casette recorder, cash register, cat, cd, cd player, ceiling, cell phone, cello, chain, chair, chessboard,
    chicken, chopstick, clip, clippers, clock, closet, cloth, clothes tree, coffee, coffee machine, comb, computer,
    concrete, cone, container, control booth, controller, cooker, copying machine, coral, cork, corkscrew, counter,
    court, cow, crabstick, crane, crate, cross, crutch, cup, curtain, cushion, cutting board, dais, disc, disc case,
    dishwasher, dock, dog, dolphin, door, drainer, dray, drink dispenser, drinking machine, drop, drug, drum,
    drum kit, duck, dumbbell, earphone, earrings, egg, electric fan, electric iron, electric pot, electric saw,
    electronic keyboard, engine, envelope, equipment, escalator, exhibition booth, extinguisher, eyeglass, fan,
    faucet, fax machine, fence, ferris wheel, fire extinguisher, fire hydrant, fire place, fish, fish tank,
    fishbowl, fishing net, fishing pole, flag, flagstaff, flame, flashlight, floor, flower, fly, foam, food,
    footbridge, forceps, fork, forklift, fountain, fox, frame, fridge, frog, fruit, funnel, furnace,
    game controller, game machine, gas cylinder, gas hood, gas stove, gift box, glass, glass marble, globe, glove,
    goal, grandstand, grass, gravestone, ground, guardrail, guitar, gun, hammer, hand cart, handle, handrail,
    hanger, hard disk drive, hat, hay, headphone, heater, helicopter, helmet, holder, hook, horse,
    horse-drawn carriage, hot-air balloon, hydrovalve, ice, inflator pump, ipod, iron, ironing board, jar, kart,
    kettle, key, keyboard, kitchen range, kite, knife, knife block, ladder, ladder truck, ladle, laptop, leaves,
    lid, life buoy, light, light bulb, lighter, line, lion, lobster, lock, machine, mailbox, mannequin, map, mask,
    mat, match book, mattress, menu, metal, meter box, microphone, microwave, mirror, missile, model, money, monkey,
    mop, motorbike, mountain, mouse, mouse pad, musical instrument, napkin, net, newspaper, oar, ornament, outlet,
    oven, oxygen bottle, pack, pan, paper, paper box, paper cutter, parachute, parasol, parterre, patio, pelage,
    pen, pen container, pencil, person, photo, piano, picture, pig, pillar, pillow, pipe, pitcher, plant, plastic,
    plate, platform, player, playground, pliers, plume, poker, poker chip, pole, pool table, postcard, poster, pot,
    pottedplant, printer, projector, pumpkin, rabbit, racket, radiator, radio, rail, rake, ramp, range hood,
    receiver, recorder, recreational machines, remote control, road, robot, rock, rocket, rocking horse, rope, rug,
    ruler, runway, saddle, sand, saw, scale, scanner, scissors, scoop, screen, screwdriver, sculpture, scythe,
    sewer, sewing machine, shed, sheep, shell, shelves, shoe, shopping cart, shovel, sidecar, sidewalk, sign,
    signal light, sink, skateboard, ski, sky, sled, slippers, smoke, snail, snake, snow, snowmobiles, sofa, spanner,
    spatula, speaker, speed bump, spice container, spoon, sprayer, squirrel, stage, stair, stapler, stick,
    sticky note, stone, stool, stove, straw, stretcher, sun, sunglass, sunshade, surveillance camera, swan, sweeper,
    swim ring, swimming pool, swing, switch, table, tableware, tank, tap, tape, tarp, telephone, telephone booth,
    tent, tire, toaster, toilet, tong, tool, toothbrush, towel, toy, toy car, track, train, trampoline, trash bin,
    tray, tree, tricycle, tripod, trophy, truck, tube, turtle, tvmonitor, tweezers, typewriter, umbrella, unknown,
    vacuum cleaner, vending machine, video camera, video game console, video player, video tape, violin, wakeboard,
    wall, wallet, wardrobe, washing machine, watch, water, water dispenser, water pipe, water skate board,
    watermelon, whale, wharf, wheel, wheelchair, window, window blinds, wineglass, wire, wood, wool
    """
)

_COCO_THINGS = _split(
    """
    person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire hydrant, stop sign,
    parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe, backpack, umbrella,
    handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, kite, baseball bat, baseball glove, skateboard,
    surfboard, tennis racket, bottle, wine glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange,
    broccoli, carrot, hot dog, pizza, donut, cake, chair, couch, potted plant, bed, dining table, toilet, tv,
    laptop, mouse, remote, keyboard, cell phone, microwave, oven, toaster, sink, refrigerator, book, clock, vase,
    scissors, teddy bear, hair drier, toothbrush
    """
)

_COCO_STUFF = _COCO_THINGS + _split(
    """
    banner, blanket, branch, bridge, building-other, bush, cabinet, cage, cardboard, carpet, ceiling-other,
    ceiling-tile, cloth, clothes, clouds, counter, cupboard, curtain, desk-stuff, dirt, door-stuff, fence,
    floor-marble, floor-other, floor-stone, floor-tile, floor-wood, flower, fog, food-other, fruit, furniture-other,
    grass, gravel, ground-other, hill, house, leaves, light, mat, metal, mirror-stuff, moss, mountain, mud, napkin,
    net, paper, pavement, pillow, plant-other, plastic, platform, playingfield, railing, railroad, river, road,
    rock, roof, rug, salad, sand, sea, shelf, sky-other, skyscraper, snow, solid-other, stairs, stone, straw,
    structural-other, table, tent, textile-other, towel, tree, vegetable, wall-brick, wall-concrete, wall-other,
    wall-panel, wall-stone, wall-tile, wall-wood, water-other, waterdrops, window-blind, window-other, wood
    """
)

_CITYSCAPES = _split(
    """
    road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation, terrain, sky, person, rider,
    car, truck, bus, train, motorcycle, bicycle
    """
)

_ADE150 = _split(
    """
    wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass, cabinet, sidewalk, person, earth, door,
    table, mountain, plant, curtain, chair, car, water, painting, sofa, shelf, house, sea, mirror, rug, field,
    armchair, seat, fence, desk, rock, wardrobe, lamp, bathtub, railing, cushion, base, box, column, signboard,
    chest of drawers, counter, sand, sink, skyscraper, fireplace, refrigerator, grandstand, path, stairs, runway,
    case, pool table, pillow, screen door, stairway, river, bridge, bookcase, blind, coffee table, toilet, flower,
    book, hill, bench, countertop, stove, palm, kitchen island, computer, swivel chair, boat, bar, arcade machine,
    hovel, bus, towel, light, truck, tower, chandelier, awning, streetlight, booth, television receiver, airplane,
    dirt track, apparel, pole, land, bannister, escalator, ottoman, bottle, buffet, poster, stage, van, ship,
    fountain, conveyer belt, canopy, washer, plaything, swimming pool, stool, barrel, basket, waterfall, tent, bag,
    minibike, cradle, oven, ball, food, step, tank, trade name, microwave, pot, animal, bicycle, lake, dishwasher,
    screen, blanket, sculpture, hood, sconce, vase, traffic light, tray, ashcan, fan, pier, crt screen, plate,
    monitor, bulletin board, shower, radiator, glass, clock, flag
    """
)

_ADE847 = _split(
    """
    wall; building, edifice; sky; tree; road, route; floor, flooring; ceiling; bed; sidewalk, pavement;
    earth, ground; cabinet; person, individual, someone, somebody, mortal, soul; grass; windowpane, window;
    car, auto, automobile, machine, motorcar; mountain, mount; plant, flora, plant life; table; chair;
    curtain, drape, drapery, mantle, pall; door; sofa, couch, lounge; sea; painting, picture; water; mirror; house;
    rug, carpet, carpeting; shelf; armchair; fence, fencing; field; lamp; rock, stone; seat; river; desk;
    bathtub, bathing tub, bath, tub; railing, rail; signboard, sign; cushion; path; work surface; stairs, steps;
    column, pillar; sink; wardrobe, closet, press; snow; refrigerator, icebox; base, pedestal, stand; bridge, span;
    blind, screen; runway; cliff, drop, drop-off; sand; fireplace, hearth, open fireplace; pillow;
    screen door, screen; toilet, can, commode, crapper, pot, potty, stool, throne; skyscraper;
    grandstand, covered stand; box; pool table, billiard table, snooker table; palm, palm tree; double door;
    coffee table, cocktail table; counter; countertop; chest of drawers, chest, bureau, dresser; kitchen island;
    boat; waterfall, falls; stove, kitchen stove, range, kitchen range, cooking stove; flower; bookcase; controls;
    book; stairway, staircase; streetlight, street lamp;
    computer, computing machine, computing device, data processor, electronic computer, information processing system;
    bus, autobus, coach, charabanc, double-decker, jitney, motorbus, motorcoach, omnibus, passenger vehicle;
    swivel chair; light, light source; bench; case, display case, showcase, vitrine; towel; fountain; embankment;
    television receiver, television, television set, tv, tv set, idiot box, boob tube, telly, goggle box; van; hill;
    awning, sunshade, sunblind; poster, posting, placard, notice, bill, card; truck, motortruck;
    airplane, aeroplane, plane; pole; tower; court; ball;
    aircraft carrier, carrier, flattop, attack aircraft carrier; buffet, counter, sideboard;
    hovel, hut, hutch, shack, shanty; apparel, wearing apparel, dress, clothes; minibike, motorbike;
    animal, animate being, beast, brute, creature, fauna; chandelier, pendant, pendent; step, stair;
    booth, cubicle, stall, kiosk; bicycle, bike, wheel, cycle; doorframe, doorcase; sconce; pond;
    trade name, brand name, brand, marque; bannister, banister, balustrade, balusters, handrail; bag;
    traffic light, traffic signal, stoplight; gazebo; escalator, moving staircase, moving stairway;
    land, ground, soil; board, plank; arcade machine; eiderdown, duvet, continental quilt; bar;
    stall, stand, sales booth; playground; ship; ottoman, pouf, pouffe, puff, hassock;
    ashcan, trash can, garbage can, wastebin, ash bin, ash-bin, ashbin, dustbin, trash barrel, trash bin; bottle;
    cradle; pot, flowerpot; conveyer belt, conveyor belt, conveyer, conveyor, transporter; train, railroad train;
    stool; lake; tank, storage tank; ice, water ice; basket, handbasket; manhole; tent, collapsible shelter; canopy;
    microwave, microwave oven; barrel, cask; dirt track; beam; dishwasher, dish washer, dishwashing machine; plate;
    screen, crt screen; ruins; washer, automatic washer, washing machine; blanket, cover; plaything, toy;
    food, solid food; screen, silver screen, projection screen; oven; stage;
    beacon, lighthouse, beacon light, pharos; umbrella; sculpture; aqueduct; container; scaffolding, staging;
    hood, exhaust hood; curb, curbing, kerb; roller coaster; horse, equus caballus; catwalk; glass, drinking glass;
    vase; central reservation; carousel; radiator; closet; machine; pier, wharf, wharfage, dock; fan;
    inflatable bounce game; pitch; paper; arcade, colonnade; hot tub; helicopter; tray; partition, divider;
    vineyard; bowl; bullring; flag; pot; footbridge, overcrossing, pedestrian bridge; shower;
    bag, traveling bag, travelling bag, grip, suitcase; bulletin board, notice board; confessional booth;
    trunk, tree trunk, bole; forest; elevator door; laptop, laptop computer; instrument panel; bucket, pail;
    tapestry, tapis; platform; jacket; gate; monitor, monitoring device;
    telephone booth, phone booth, call box, telephone box, telephone kiosk; spotlight, spot; ring; control panel;
    blackboard, chalkboard; air conditioner, air conditioning; chest; clock; sand dune; pipe, pipage, piping; vault;
    table football; cannon; swimming pool, swimming bath, natatorium; fluorescent, fluorescent fixture; statue;
    loudspeaker, speaker, speaker unit, loudspeaker system, speaker system; exhibitor; ladder; carport; dam; pulpit;
    skylight, fanlight; water tower; grill, grille, grillwork; display board; pane, pane of glass, window glass;
    rubbish, trash, scrap; ice rink; fruit; patio; vending machine; telephone, phone, telephone set; net;
    backpack, back pack, knapsack, packsack, rucksack, haversack; jar; track; magazine; shutter; roof;
    banner, streamer; landfill; post; altarpiece, reredos; hat, chapeau, lid; arch, archway; table game;
    bag, handbag, pocketbook, purse; document, written document, papers; dome; pier; shanties; forecourt; crane;
    dog, domestic dog, canis familiaris; piano, pianoforte, forte-piano; drawing; cabin;
    ad, advertisement, advertizement, advertising, advertizing, advert; amphitheater, amphitheatre, coliseum;
    monument; henhouse; cockpit; heater, warmer; windmill, aerogenerator, wind generator; pool; elevator, lift;
    decoration, ornament, ornamentation; labyrinth; text, textual matter; printer; mezzanine, first balcony;
    mattress; straw; stalls; patio, terrace; billboard, hoarding; bus stop; trouser, pant; console table, console;
    rack; notebook; shrine; pantry; cart; steam shovel; porch; postbox, mailbox, letter box; figurine, statuette;
    recycling bin; folding screen; telescope; deck chair, beach chair; kennel; coffee maker;
    altar, communion table, lord's table; fish; easel; artificial golf green; iceberg; candlestick, candle holder;
    shower stall, shower bath; television stand;
    wall socket, wall plug, electric outlet, electrical outlet, outlet, electric receptacle; skeleton;
    grand piano, grand; candy, confect; grille door; pedestal, plinth, footstall; jersey, t-shirt, tee shirt; shoe;
    gravestone, headstone, tombstone; shanty; structure; rocking chair, rocker; bird; place mat; tomb; big top;
    gas pump, gasoline pump, petrol pump, island dispenser; lockers; cage; finger; bleachers; ferris wheel;
    hairdresser chair; mat; stands; aquarium, fish tank, marine museum;
    streetcar, tram, tramcar, trolley, trolley car; napkin, table napkin, serviette; dummy;
    booklet, brochure, folder, leaflet, pamphlet; sand trap; shop, store; table cloth; service station; coffin;
    drawer; cages; slot machine, coin machine; balcony; volleyball court; table tennis; control table; shirt;
    merchandise, ware, product; railway; parterre; chimney; can, tin, tin can; tanks;
    fabric, cloth, material, textile; alga, algae; system; map; greenhouse; mug; barbecue; trailer;
    toilet tissue, toilet paper, bathroom tissue; organ; dishrag, dishcloth; island; keyboard; trench;
    basket, basketball hoop, hoop; steering wheel, wheel; pitcher, ewer; goal; bread, breadstuff, staff of life;
    beds; wood; file cabinet; newspaper, paper; motorboat; rope; guitar; rubble; scarf; barrels; cap; leaves;
    control tower; dashboard; bandstand; lectern; switch, electric switch, electrical switch;
    baseboard, mopboard, skirting board; shower room; smoke; faucet, spigot; bulldozer; saucepan; shops; meter;
    crevasse; gear; candelabrum, candelabra; sofa bed; tunnel; pallet; wire, conducting wire; kettle, boiler; bidet;
    baby buggy, baby carriage, carriage, perambulator, pram, stroller, go-cart, pushchair, pusher; music stand;
    pipe, tube; cup; parking meter; ice hockey rink; shelter; weeds; temple; patty, cake; ski slope; panel; wallet;
    wheel; towel rack, towel horse; roundabout; canister, cannister, tin; rod; soap dispenser; bell; canvas;
    box office, ticket office, ticket booth; teacup; trellis; workbench; valley, vale; toaster; knife; podium; ramp;
    tumble dryer; fireplug, fire hydrant, plug; gym shoe, sneaker, tennis shoe; lab bench; equipment;
    rocky formation; plastic; calendar; caravan; check-in-desk; ticket counter; brush; mill; covered bridge;
    bowling alley; hanger; excavator; trestle; revolving door; blast furnace; scale, weighing machine; projector;
    soap; locker; tractor; stretcher; frame; grating; alembic; candle, taper, wax light; barrier; cardboard; cave;
    puddle; tarp; price tag; watchtower; meters;
    light bulb, lightbulb, bulb, incandescent lamp, electric light, electric-light bulb; tracks; hair dryer; skirt;
    viaduct; paper towel; coat; sheet; fire extinguisher, extinguisher, asphyxiator; water wheel; pottery, clayware;
    magazine rack; teapot; microphone, mike; support; forklift; canyon; cash register, register;
    leaf, leafage, foliage; remote control, remote; soap dish; windshield, windscreen; cat;
    cue, cue stick, pool cue, pool stick; vent, venthole, vent-hole, blowhole; videos; shovel; eaves;
    antenna, aerial, transmitting aerial; shipyard; hen, biddy; traffic cone; washing machines; truck crane; cds;
    niche; scoreboard; briefcase; boot; sweater, jumper; hay; pack; bottle rack; glacier; pergola;
    building materials; television camera; first floor; rifle; tennis table; stadium; safety belt; cover; dish rack;
    synthesizer; pumpkin; gutter; fruit stand; ice floe, floe; handle, grip, handgrip, hold; wheelchair;
    mousepad, mouse mat; diploma; fairground ride; radio; hotplate; junk; wheelbarrow; stream; toll plaza;
    punching bag; trough; throne; chair desk; weighbridge; extractor fan; hanging clothes;
    dish, dish aerial, dish antenna, saucer; alarm clock, alarm; ski lift; chain; garage; mechanical shovel;
    wine rack; tramway; treadmill; menu; block; well; witness stand; branch; duck; casserole; frying pan;
    desk organizer; mast; spectacles, specs, eyeglasses, glasses; service elevator; dollhouse; hammock;
    clothes hanging; photocopier; notepad; golf cart; footpath; cross; baptismal font; boiler; skip; rotisserie;
    tables; water mill; helmet; cover curtain; brick; table runner; ashtray; street box; stick; hangers; cells;
    urinal; centerpiece; portable fridge; dvds; golf club; skirting board; water cooler; clipboard;
    camera, photographic camera; pigeonhole; chips; food processor; post box; lid; drum; blender; cave entrance;
    dental chair; obelisk; canoe; mobile; monitors; pool ball; cue rack; baggage carts; shore; fork; paper filer;
    bicycle rack; coat rack; garland; sports bag; fish tank; towel dispenser; carriage; brochure; plaque; stringer;
    iron; spoon; flag pole; toilet brush; book stand; water faucet, water tap, tap, hydrant; ticket office; broom;
    dvd; ice bucket; carapace, shell, cuticle, shield; tureen; folders; chess; root; sewing machine; model; pen;
    violin; sweatshirt; recycling materials; mitten; chopping board, cutting board; mask; log;
    mouse, computer mouse; grill; hole; target; trash bag; chalk; sticks; balloon; score; hair spray; roll; runner;
    engine; inflatable glove; games; pallets; baskets; coop; dvd player; rocking horse; buckets; bread rolls; shawl;
    watering can; spotlights; post-it; bowls; security camera; runner cloth; lock;
    alarm, warning device, alarm system; side; roulette; bone; cutlery; pool balls; wheels; spice rack; plant pots;
    towel ring; bread box; video; funfair; breads; tripod; ironing board; skimmer; hollow; scratching post;
    tricycle; file box; mountain pass; tombstones; cooker; card game, cards; golf bag; towel paper; chaise lounge;
    sun; toilet paper holder; rake; key; umbrella stand; dartboard; transformer; fireplace utensils; sweatshirts;
    cellular telephone, cellular phone, cellphone, cell, mobile phone; tallboy; stapler; sauna; test tube; palette;
    shopping carts; tools; push button, push, button; star; roof rack; barbed wire; spray; ear; sponge; racket;
    tins; eyeglasses; file; scarfs; sugar bowl; flip flop; headstones; laptop bag; leash; climbing frame;
    suit hanger; floor spotlight; plate rack; sewer; hard drive; sprinkler; tools box; necklace; bulbs;
    steel industry; club; jack; door bars; control panel, instrument panel, control board, board, panel; hairbrush;
    napkin holder; office; smoke detector; utensils; apron; scissors; terminal; grinder; entry phone;
    newspaper stand; pepper shaker; onions;
    central processing unit, cpu, c p u , central processor, processor, mainframe; tape; bat; coaster; calculator;
    potatoes; luggage rack; salt; street number; viewpoint; sword; cd; rowing machine; plug;
    andiron, firedog, dog, dog-iron; pepper; tongs; bonfire; dog dish; belt; dumbbells; videocassette recorder, vcr;
    hook; envelopes; shower faucet; watch; padlock; swimming pool ladder; spanners; gravy boat; notice board;
    trash bags; fire alarm; ladle; stethoscope; rocket; funnel; bowling pins; valve; thermometer; cups; spice jar;
    night light; soaps; games table; slotted spoon; reel; scourer; sleeping robe; desk mat; dumbbell; hammer; tie;
    typewriter; shaker; cheese dish; sea star; racquet; butane gas cylinder; paper weight; shaving brush;
    sunglasses; gear shift; towel rail; adding machine, totalizer, totaliser
    """,
    sep=";",
)

# COCO-Stuff-27: each coarse class with its members among the 171 fine classes. Thing classes of the full COCO
# hierarchy that the 171-class benchmark does not annotate (street sign, hat, shoe, eye glasses, plate, mirror,
# window, desk, door, blender, hair brush) are left out.
_COCO_HIERARCHY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("electronic", ("tv", "laptop", "mouse", "remote", "keyboard", "cell phone")),
    ("appliance", ("microwave", "oven", "toaster", "sink", "refrigerator")),
    ("food", ("banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake")),
    ("furniture", ("chair", "couch", "potted plant", "bed", "dining table", "toilet")),
    ("indoor", ("book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")),
    ("kitchen", ("bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl")),
    ("accessory", ("backpack", "umbrella", "handbag", "tie", "suitcase")),
    ("animal", ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")),
    ("outdoor", ("traffic light", "fire hydrant", "stop sign", "parking meter", "bench")),
    ("person", ("person",)),
    (
        "sports",
        (
            "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
            "surfboard", "tennis racket",
        ),
    ),
    ("vehicle", ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat")),
    ("ceiling", ("ceiling-other", "ceiling-tile")),
    ("floor", ("carpet", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood")),
    ("food-stuff", ("food-other", "fruit", "salad", "vegetable")),
    (
        "furniture-stuff",
        (
            "cabinet", "counter", "cupboard", "desk-stuff", "door-stuff", "furniture-other", "light", "mirror-stuff",
            "shelf", "stairs", "table",
        ),
    ),
    ("rawmaterial", ("cardboard", "metal", "paper", "plastic")),
    (
        "textile",
        (
            "banner", "blanket", "cloth", "clothes", "curtain", "mat", "napkin", "pillow", "rug", "textile-other",
            "towel",
        ),
    ),
    ("wall", ("wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood")),
    ("window", ("window-blind", "window-other")),
    ("building", ("bridge", "building-other", "house", "roof", "skyscraper", "tent")),
    (
        "ground",
        (
            "dirt", "gravel", "ground-other", "mud", "pavement", "platform", "playingfield", "railroad", "road", "sand",
            "snow",
        ),
    ),
    ("plant", ("branch", "bush", "flower", "grass", "leaves", "moss", "plant-other", "straw", "tree")),
    ("sky", ("clouds", "sky-other")),
    ("solid", ("hill", "mountain", "rock", "solid-other", "stone", "wood")),
    ("structural", ("cage", "fence", "net", "railing", "structural-other")),
    ("water", ("fog", "river", "sea", "water-other", "waterdrops")),
)

COARSE_27: tuple[str, ...] = tuple(coarse for coarse, _ in _COCO_HIERARCHY)
_COARSE_OF = {fine: index for index, (_, members) in enumerate(_COCO_HIERARCHY) for fine in members}
FINE_TO_COARSE: tuple[int, ...] = tuple(_COARSE_OF[fine] for fine in _COCO_STUFF)

DATASETS: tuple[str, ...] = (
    "voc21",
    "voc20",
    "pc60",
    "pc59",
    "pc459",
    "coco-object",
    "coco-stuff",
    "coco-stuff27",
    "cityscapes",
    "ade150",
    "ade847",
)

CLASSES: dict[str, tuple[str, ...]] = {
    "voc21": (BACKGROUND, *_VOC20),
    "voc20": _VOC20,
    "pc60": (BACKGROUND, *_PC59),
    "pc59": _PC59,
    "pc459": _PC459,
    "coco-object": (BACKGROUND, *_COCO_THINGS),
    "coco-stuff": _COCO_STUFF,
    "coco-stuff27": COARSE_27,
    "cityscapes": _CITYSCAPES,
    "ade150": _ADE150,
    "ade847": _ADE847,
}

# ----------------------------------------------------------------------------------------------------------------
# Text-query names.

STYLES: tuple[str, ...] = ("sclip", "clearclip", "itaclip", "cliptrase", "proxyclip", "corrclip")

# Background names (the names of class 0).
_BG_SCLIP = _split(
    """
    sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, building, cloud, lamp, door, window,
    wardrobe, ceiling, shelf, curtain, stair, floor, hill, rail, fence
    """
)
_BG_PROXYCLIP_COCO = _split(
    "sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, building, cloud, floor, hill, rail"
)
_BG_ITACLIP_VOC = _split(
    """
    sky, wall, tree, wood, grass, road, mountain, sands, desk, bed, building, lamp, door, window, wardrobe, ceiling,
    shelf, curtain, stair, floor, fence, ground, water, railway, helmet, house, bridge, sign, keyboard, refrigerator,
    bench, sink, laptop, clock, blanket, branch, bush, cabinet, clouds, cupboard, pavement, platform, roof, sea
    """
)
_BG_CLIPTRASE_VOC = _split(
    """
    background, sky, wall, white, tree, wood, grass, road, trail, sea, river, water, box, signboard, mountain, sands,
    bed, bed, building, cloud, lamp, door, window, wardrobe, ceiling, shelf, curtain, stair, floor, ground, beachhill,
    rail, fence
    """
)
# CLIPtrase's COCO-Object background: 16 extra stuff words, then the 91 COCO-Stuff stuff classes.
_BG_CLIPTRASE_COCO = _split(
    """
    textile, building, furniture, structural, floor, ceiling, sky, ground, water, food, solid, wall, window, desk,
    lamp, wardrobe
    """
) + _COCO_STUFF[len(_COCO_THINGS) :]

# Synonyms.
_PERSON_CLOTHES = _split(
    "person, person in shirt, person in jeans, person in dress, person in sweater, person in skirt, person in jacket"
)
_TV_SCLIP = ("television monitor", "tv monitor", "monitor", "television", "screen")
_TV_ITACLIP = ("tvmonitor", "television monitor", "monitor", "television", "screen")
_ITACLIP_SYNONYMS = {"cat": ("cat", "feline"), "chair": ("chair", "seat"), "motorbike": ("motorbike", "motorcycle")}
# SCLIP-family VOC names for two VOC classes.
_VOC_RENAMES = {"boat": ("ship",), "diningtable": ("table",)}


def _queries(
    classes: tuple[str, ...], overrides: Mapping[str, tuple[str, ...]] | None = None, *, fuse: bool = False
) -> tuple[tuple[str, ...], ...]:
    """One tuple of query names per class: ``overrides[name]`` where given, else the class name itself.

    ``fuse`` removes the spaces from the names that are not overridden (``traffic light`` -> ``trafficlight``).
    """
    overrides = overrides or {}
    return tuple(overrides.get(name, (name.replace(" ", "") if fuse else name,)) for name in classes)


_SCLIP_VOC = {**_VOC_RENAMES, "person": _PERSON_CLOTHES, "tvmonitor": _TV_SCLIP}
_ITACLIP_PERSON_HAT = (*_PERSON_CLOTHES, "person in hat")
_ITACLIP_TV_COCO = ("tv", *_TV_ITACLIP)

QUERY_NAMES: dict[tuple[str, str], tuple[tuple[str, ...], ...]] = {
    # SCLIP / NACLIP (also MaskCLIP and vanilla CLIP).
    ("voc21", "sclip"): _queries(CLASSES["voc21"], {BACKGROUND: _BG_SCLIP, **_SCLIP_VOC}),
    ("voc20", "sclip"): _queries(_VOC20, _SCLIP_VOC),
    ("pc60", "sclip"): _queries(CLASSES["pc60"]),
    ("pc59", "sclip"): _queries(_PC59),
    ("coco-object", "sclip"): _queries(
        CLASSES["coco-object"], {BACKGROUND: _BG_SCLIP, "person": (*_PERSON_CLOTHES, "body")}
    ),
    ("coco-stuff", "sclip"): _queries(_COCO_STUFF, fuse=True),
    ("cityscapes", "sclip"): _queries(_CITYSCAPES, fuse=True),
    ("ade150", "sclip"): _queries(_ADE150, fuse=True),
    # ClearCLIP.
    ("voc21", "clearclip"): _queries(CLASSES["voc21"], _VOC_RENAMES),
    ("voc20", "clearclip"): _queries(_VOC20, _VOC_RENAMES),
    ("pc60", "clearclip"): _queries(CLASSES["pc60"]),
    ("pc59", "clearclip"): _queries(_PC59),
    ("coco-object", "clearclip"): _queries(CLASSES["coco-object"]),
    ("coco-stuff", "clearclip"): _queries(_COCO_STUFF, fuse=True),
    ("cityscapes", "clearclip"): _queries(_CITYSCAPES, fuse=True),
    ("ade150", "clearclip"): _queries(_ADE150, fuse=True),
    # ITACLIP.
    ("voc21", "itaclip"): _queries(
        CLASSES["voc21"],
        {
            BACKGROUND: _BG_ITACLIP_VOC,
            **_VOC_RENAMES,
            **_ITACLIP_SYNONYMS,
            "bird": ("bird", "avian"),
            "person": (*_ITACLIP_PERSON_HAT, "body"),
            "tvmonitor": _TV_SCLIP,
        },
    ),
    ("pc60", "itaclip"): _queries(
        CLASSES["pc60"],
        {**_ITACLIP_SYNONYMS, "person": (*_ITACLIP_PERSON_HAT, "body"), "tvmonitor": _TV_ITACLIP},
    ),
    ("coco-object", "itaclip"): _queries(
        CLASSES["coco-object"],
        {BACKGROUND: _BG_SCLIP, "person": (*_PERSON_CLOTHES, "body", "person in hat"), "tv": _ITACLIP_TV_COCO},
    ),
    ("coco-stuff", "itaclip"): _queries(
        _COCO_STUFF, {"person": _ITACLIP_PERSON_HAT, "tv": _ITACLIP_TV_COCO}, fuse=True
    ),
    ("cityscapes", "itaclip"): _queries(_CITYSCAPES, {"person": _ITACLIP_PERSON_HAT}, fuse=True),
    # CLIPtrase.
    ("voc21", "cliptrase"): _queries(CLASSES["voc21"], {BACKGROUND: _BG_CLIPTRASE_VOC, "tvmonitor": ("tv",)}),
    ("voc20", "cliptrase"): _queries(_VOC20, {"tvmonitor": ("tv",)}),
    ("pc60", "cliptrase"): _queries(CLASSES["pc60"], {"table": ("diningtable",)}),
    ("pc59", "cliptrase"): _queries(_PC59, {"table": ("diningtable",)}),
    ("pc459", "cliptrase"): _queries(_PC459),
    ("coco-object", "cliptrase"): _queries(CLASSES["coco-object"], {BACKGROUND: _BG_CLIPTRASE_COCO}),
    ("coco-stuff", "cliptrase"): _queries(_COCO_STUFF),
    ("ade150", "cliptrase"): _queries(_ADE150),
    ("ade847", "cliptrase"): _queries(_ADE847),
}

# ProxyCLIP (its published VOC21, VOC20 and COCO-Object files; the other datasets take SCLIP's single names).
_PROXYCLIP = {
    "voc21": _queries(CLASSES["voc21"], {BACKGROUND: _BG_SCLIP, **_VOC_RENAMES}),
    "voc20": _queries(_VOC20, _VOC_RENAMES),
    "coco-object": _queries(CLASSES["coco-object"], {BACKGROUND: _BG_PROXYCLIP_COCO}),
    **{d: QUERY_NAMES[(d, "sclip")] for d in ("pc60", "pc59", "coco-stuff", "cityscapes", "ade150")},
}
QUERY_NAMES.update({(dataset, "proxyclip"): names for dataset, names in _PROXYCLIP.items()})
# CorrCLIP: ProxyCLIP's lists with "people" for person (its VOC21, PC59 and Cityscapes files).
QUERY_NAMES.update({
    (dataset, "corrclip"): tuple(("people",) if n == ("person",) else n for n in names)
    if dataset in ("voc21", "voc20", "pc60", "pc59", "cityscapes") else names
    for dataset, names in _PROXYCLIP.items()
})


def query_names(dataset: str, style: str) -> tuple[tuple[str, ...], ...]:
    """The text-query names of ``dataset``'s classes in ``style`` (one tuple per class, in label-id order)."""
    if dataset not in CLASSES:
        raise ValueError(f"Unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}.")
    try:
        return QUERY_NAMES[(dataset, style)]
    except KeyError:
        styles = [s for s in STYLES if (dataset, s) in QUERY_NAMES]
        available = ", ".join(styles) if styles else "none"
        raise ValueError(
            f"No {style!r} name list for {dataset!r}; styles published for {dataset!r}: {available} "
            f"(all styles: {', '.join(STYLES)})."
        ) from None


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot splits (ids into CLASSES[dataset]; seen = all other classes).


def _ids(dataset: str, names: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(sorted(CLASSES[dataset].index(name) for name in names))


_COCO_UNSEEN = (
    "frisbee", "skateboard", "cardboard", "carrot", "scissors", "suitcase", "giraffe", "cow", "road", "wall-concrete",
    "tree", "grass", "river", "clouds", "playingfield",
)

_ADE847_RARE = (
    166, 176, 193, 208, 264, 267, 273, 287, 298, 303, 311, 317, 328, 329, 330, 340, 342, 344, 347, 349, 356, 358,
    376, 380, 383, 394, 400, 401, 402, 404, 411, 415, 417, 420, 421, 430, 431, 443, 445, 446, 453, 454, 458, 459,
    463, 468, 471, 472, 474, 477, 482, 485, 494, 505, 507, 511, 512, 521, 522, 523, 525, 527, 528, 529, 530, 533,
    535, 536, 541, 544, 546, 547, 548, 549, 550, 551, 557, 559, 560, 561, 562, 563, 565, 566, 567, 575, 576, 577,
    579, 580, 581, 582, 584, 585, 586, 587, 588, 589, 591, 592, 595, 598, 599, 601, 604, 605, 606, 608, 609, 611,
    612, 613, 615, 617, 618, 620, 622, 623, 624, 627, 629, 630, 631, 632, 633, 636, 639, 641, 643, 651, 652, 653,
    655, 656, 657, 661, 663, 664, 665, 666, 667, 668, 670, 671, 673, 674, 675, 676, 679, 681, 682, 684, 685, 687,
    690, 691, 693, 694, 695, 698, 702, 703, 704, 707, 708, 709, 710, 711, 712, 714, 717, 718, 719, 722, 724, 725,
    726, 727, 728, 730, 732, 733, 734, 735, 736, 739, 740, 741, 742, 747, 748, 751, 752, 753, 754, 755, 757, 758,
    759, 761, 762, 763, 764, 766, 767, 768, 769, 770, 771, 772, 774, 776, 777, 778, 779, 781, 782, 783, 785, 786,
    787, 788, 790, 791, 792, 793, 794, 796, 798, 799, 800, 801, 802, 804, 805, 806, 807, 808, 809, 810, 811, 812,
    813, 815, 816, 817, 818, 819, 820, 821, 822, 823, 824, 825, 826, 827, 828, 829, 830, 831, 832, 833, 834, 835,
    836, 837, 838, 839, 840, 841, 842, 843, 844, 845, 846,
)

ZERO_SHOT_SPLITS: dict[str, dict[str, tuple[int, ...]]] = {
    "coco-stuff": {"unseen": _ids("coco-stuff", _COCO_UNSEEN)},
    "voc20": {"unseen": _ids("voc20", ("pottedplant", "sheep", "sofa", "train", "tvmonitor"))},
    "ade847": {"unseen": _ADE847_RARE},
}

# ----------------------------------------------------------------------------------------------------------------
# Palettes.

# mmseg's ADE20K palette, one RRGGBB colour per class.
_ADE150_PALETTE_HEX = """
    787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 e005ff ebff07 96053d 787846 08ff33
    ff0652 8fff8c ccff04 ff3307 cc4603 0066c8 3de6fa ff0633 0b66ff ff0747 ff09e0 0907e6 dcdcdc ff095c 7009ff
    08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff e0ff08 6608ff ff3d06 ffc207 ff7a08 00ff14 ff0829 ff0599 0633ff
    eb0cff a09614 00a3ff 8c8c8c fa0a0f 14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff
    0bc8c8 ff5200 00fff5 003dff 00ff70 00ff85 ff0000 ffa300 ff6600 c2ff00 008fff 33ff00 0052ff 00ff29 00ffad
    0a00ff adff00 00ff99 ff5c00 ff00ff ff00f5 ff0066 ffad00 ff0014 ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2
    00ff52 000aff 0070ff 3300ff 00c2ff 007aff 00ffa3 ff9900 00ff0a ff7000 8fff00 5200ff a3ff00 ffeb00 08b8aa
    8500ff 00ff5c b800ff ff001f 00b8ff 00d6ff ff0070 5cff00 00e0ff 70e0ff 46b8a0 a300ff 9900ff 47ff00 ff00a3
    ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 0abed4 d6ff00 00ccff 1400ff ffff00 0099ff 0029ff
    00ffcc 2900ff 29ff00 ad00ff 00f5ff 4700ff 7a00ff 00ffb8 005cff b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff
"""

_CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153), (250, 170, 30),
    (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142),
    (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


def _bitshift_palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map: bit ``3*j + c`` of the label sets bit ``7 - j`` of channel ``c``."""
    labels = np.arange(n, dtype=np.int64)
    colours = np.zeros((n, 3), dtype=np.int64)
    for j in range(8):
        for channel in range(3):
            colours[:, channel] |= ((labels >> (3 * j + channel)) & 1) << (7 - j)
    return colours.astype(np.uint8)


def _official_palette(dataset: str) -> np.ndarray | None:
    if dataset == "voc21":
        return _bitshift_palette(21)
    if dataset == "voc20":
        return _bitshift_palette(21)[1:]
    if dataset in ("ade150", "pc60", "pc59"):
        ade = np.frombuffer(bytes.fromhex(_ADE150_PALETTE_HEX), dtype=np.uint8).reshape(-1, 3)
        return {"ade150": ade, "pc60": ade[:60], "pc59": ade[1:60]}[dataset]
    if dataset == "cityscapes":
        return np.array(_CITYSCAPES_PALETTE, dtype=np.uint8)
    return None


def palette(dataset: str | None, n: int) -> np.ndarray:
    """An ``(n, 3)`` uint8 RGB palette: ``dataset``'s official colours where known, else the VOC bit-shift colours.

    ``dataset=None`` (a custom vocabulary) gives the bit-shift palette. Colours past the end of an official palette
    are the bit-shift colours of the same indices.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    if dataset is not None and dataset not in CLASSES:
        raise ValueError(f"Unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)} (or None).")
    colours = _bitshift_palette(n)
    official = _official_palette(dataset) if dataset is not None else None
    if official is not None:
        k = min(n, len(official))
        colours[:k] = official[:k]
    return colours
